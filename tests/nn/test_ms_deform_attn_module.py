"""kdops.nn.MSDeformAttn against an mmcv-style module written here from mmcv 2.x's
MultiScaleDeformableAttention (constructor, init_weights, forward) and its grid_sample path."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdops.nn import MSDeformAttn

LEVELS = [(6, 9), (3, 5), (2, 3), (1, 2)]


def msda_pytorch(value, spatial_shapes, sampling_locations, attention_weights):
    # mmcv.ops.multi_scale_deform_attn.multi_scale_deformable_attn_pytorch
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in spatial_shapes.tolist()], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (H_, W_) in enumerate(spatial_shapes.tolist()):
        value_l_ = value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, embed_dims, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear",
                                                 padding_mode="zeros", align_corners=False))
    attention_weights = attention_weights.transpose(1, 2).reshape(bs * num_heads, 1, num_queries,
                                                                  num_levels * num_points)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(
        bs, num_heads * embed_dims, num_queries)
    return output.transpose(1, 2).contiguous()


class MMCVStyle(nn.Module):
    """mmcv's MultiScaleDeformableAttention, minus BaseModule and registries."""

    def __init__(self, embed_dims=256, num_heads=8, num_levels=4, num_points=4, im2col_step=64, dropout=0.1,
                 batch_first=False, norm_cfg=None, init_cfg=None, value_proj_ratio=1.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.embed_dims, self.num_levels, self.num_heads, self.num_points = embed_dims, num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        nn.init.constant_(self.sampling_offsets.bias, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid_init[:, :, i, :] *= i + 1
        self.sampling_offsets.bias.data = grid_init.view(-1)
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight, gain=1)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight, gain=1)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_padding_mask=None,
                reference_points=None, spatial_shapes=None, level_start_index=None, **kwargs):
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        bs, num_value, _ = value.shape
        assert (spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum() == num_value
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels,
                                                             self.num_points, 2)
        attention_weights = self.attention_weights(query).view(bs, num_query, self.num_heads,
                                                               self.num_levels * self.num_points)
        attention_weights = attention_weights.softmax(-1).view(bs, num_query, self.num_heads, self.num_levels,
                                                               self.num_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        else:
            sampling_locations = (reference_points[:, :, None, :, None, :2] + sampling_offsets / self.num_points
                                  * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = msda_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


def geometry():
    shapes = torch.tensor(LEVELS)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def inputs(bs=3, nq=7, C=32, ref_dim=2, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = geometry()
    sh = lambda a, b: (a, b, C) if batch_first else (b, a, C)  # noqa: E731
    query = torch.randn(*sh(bs, nq), generator=g, dtype=torch.float64)
    value = torch.randn(*sh(bs, S), generator=g, dtype=torch.float64)
    pos = torch.randn(*sh(bs, nq), generator=g, dtype=torch.float64)
    ref = torch.rand(bs, nq, len(LEVELS), ref_dim, generator=g, dtype=torch.float64)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    mask = torch.rand(bs, S, generator=g) < 0.2
    return dict(query=query, value=value, query_pos=pos, reference_points=ref, spatial_shapes=shapes,
                level_start_index=starts, key_padding_mask=mask)


def test_same_state_dict_keys_shapes_and_initialisation():
    torch.manual_seed(3)
    ours = MSDeformAttn(embed_dims=64, num_heads=4, num_levels=3, num_points=2, value_proj_ratio=0.5)
    torch.manual_seed(3)
    theirs = MMCVStyle(embed_dims=64, num_heads=4, num_levels=3, num_points=2, value_proj_ratio=0.5)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) == [f"{m}.{p}" for m in ("sampling_offsets", "attention_weights", "value_proj",
                                                        "output_proj") for p in ("weight", "bias")]
    for k in a:  # same RNG draws in the same order: identical initialisation
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # head 1 of 4 points along +y (theta = pi/2), scaled by the point index
    bias = a["sampling_offsets.bias"].view(4, 3, 2, 2)
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("batch_first", [False, True])
def test_output_and_grads_equal_mmcv_style_module(ref_dim, batch_first):
    torch.manual_seed(0)
    theirs = MMCVStyle(embed_dims=32, num_heads=4, num_levels=4, num_points=3, batch_first=batch_first).double()
    # non-trivial weights (mmcv's init zeroes the offset and attention projections)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = MSDeformAttn(embed_dims=32, num_heads=4, num_levels=4, num_points=3, batch_first=batch_first,
                        im2col_step=2).double()
    ours.load_state_dict(theirs.state_dict())  # an mmcv checkpoint loads unchanged (strict)
    ours.eval()
    theirs.eval()
    x = inputs(ref_dim=ref_dim, batch_first=batch_first)
    q1, q2 = x["query"].clone().requires_grad_(), x["query"].clone().requires_grad_()
    out = ours(**{**x, "query": q1})
    ref = theirs(**{**x, "query": q2})
    assert out.shape == x["query"].shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-9, rtol=1e-8)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-8, msg=name)


def test_value_none_identity_and_dropout_like_mmcv():
    torch.manual_seed(1)
    ours = MSDeformAttn(embed_dims=16, num_heads=2, num_levels=4, num_points=2, dropout=0.0)
    theirs = MMCVStyle(embed_dims=16, num_heads=2, num_levels=4, num_points=2, dropout=0.0)
    theirs.load_state_dict(ours.state_dict())
    shapes, starts, S = geometry()
    query = torch.randn(S, 2, 16)  # encoder self-attention: value = query
    ident = torch.randn(S, 2, 16)
    ref = torch.rand(2, S, 4, 2)
    kw = dict(reference_points=ref, spatial_shapes=shapes, level_start_index=starts, identity=ident)
    torch.testing.assert_close(ours(query, **kw), theirs(query, **kw), atol=1e-5, rtol=1e-5)


def test_bf16_module_runs_and_is_close():
    torch.manual_seed(2)
    m = MSDeformAttn(embed_dims=32, num_heads=4, num_levels=4, num_points=2, dropout=0.0)
    x = inputs(ref_dim=2, seed=5)
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in x.items()}
    want = m(**x)
    got = m.to(torch.bfloat16)(**{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in x.items()})
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MSDeformAttn(embed_dims=30, num_heads=8)
    m = MSDeformAttn(embed_dims=16, num_heads=2, num_levels=4, num_points=1).double()
    x = inputs(C=16)
    with pytest.raises(ValueError, match="must be 2 or 4"):
        m(**{**x, "reference_points": torch.rand(3, 7, 4, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="spatial_shapes"):
        m(**{**x, "value": x["value"][:-1]})


def test_module_compiles_fullgraph():
    torch.manual_seed(4)
    m = MSDeformAttn(embed_dims=16, num_heads=2, num_levels=4, num_points=2, dropout=0.0)
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs(C=16).items()}
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(**x), m(**x))
