"""kdops.nn's UniKD modules (UniKDDecoderLayer, AdaptiveKnowledgeExtractor, UniKDAdaptor).

Oracles: an eager Deformable-DETR decoder layer written here from the formulas (explicit
multi-head attention, ``F.grid_sample`` deformable sampling, ``F.layer_norm``), the module run
with kdops.reference's ms_deform_attn in place of the kernel, and the parameter counts of the
layers' shapes."""
import importlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops.losses import UniKDLoss
from kdops.nn import AdaptiveKnowledgeExtractor, UniKDAdaptor, UniKDDecoderLayer

F64 = torch.float64
MSDA_MODULE = importlib.import_module("kdops.nn.ms_deform_attn")  # where MSDeformAttn looks its op up
SIZES = [(5, 7), (3, 4)]
C, M, P, FFN = 16, 4, 2, 24


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def maps(N=2, channels=C, sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    chans = channels if isinstance(channels, (list, tuple)) else [channels] * len(sizes)
    return [torch.randn(N, c, h, w, generator=g, dtype=F64) for c, (h, w) in zip(chans, sizes)]


def perturbed(module, scale=0.2):
    """fp64 copy with every parameter moved off its initialisation (MSDA starts with zero offset
    and attention projections, which would hide errors in those paths)."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def layer_kwargs():
    return dict(embed_dims=C, num_heads=M, num_levels=len(SIZES), num_points=P, ffn_dims=FFN)


# ----------------------------------------------------------------------------- eager oracle
def eager_msda(attn, query, pos, ref, feats):
    """MSDeformAttn's formula with grid_sample (ref (N,Q,2) or (N,Q,4), same on every level)."""
    N, Q, _ = query.shape
    L = len(feats)
    value = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
    value = F.linear(value, attn.value_proj.weight, attn.value_proj.bias)
    x = query + pos if pos is not None else query
    off = F.linear(x, attn.sampling_offsets.weight, attn.sampling_offsets.bias).view(N, Q, M, L, P, 2)
    w = F.linear(x, attn.attention_weights.weight, attn.attention_weights.bias).view(N, Q, M, L * P)
    w = w.softmax(-1).view(N, Q, M, L, P)
    out = torch.zeros(N, Q, M, C // M, dtype=query.dtype)
    start = 0
    for lvl, f in enumerate(feats):
        H, W = f.shape[-2:]
        v = value[:, start:start + H * W].view(N, H, W, M, C // M).permute(0, 3, 4, 1, 2)  # (N,M,d,H,W)
        start += H * W
        if ref.shape[-1] == 2:
            loc = ref[:, :, None, None, :] + off[:, :, :, lvl] / torch.tensor([W, H], dtype=F64)
        else:
            loc = ref[:, :, None, None, :2] + off[:, :, :, lvl] / P * ref[:, :, None, None, 2:] * 0.5
        for m in range(M):
            s = F.grid_sample(v[:, m], 2 * loc[:, :, m] - 1, mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # (N,d,Q,P)
            out[:, :, m] += (s * w[:, None, :, m, lvl]).sum(-1).transpose(1, 2)
    out = F.linear(out.reshape(N, Q, C), attn.output_proj.weight, attn.output_proj.bias)
    return out + query


def eager_layer(layer, query, ref, feats, pos):
    N, Q, _ = query.shape
    d = C // M
    qk = query if pos is None else query + pos
    Wi, bi = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    heads = lambda x: x.view(N, Q, M, d).transpose(1, 2)  # noqa: E731
    q = heads(F.linear(qk, Wi[:C], bi[:C]))
    k = heads(F.linear(qk, Wi[C:2 * C], bi[C:2 * C]))
    v = heads(F.linear(query, Wi[2 * C:], bi[2 * C:]))
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
    a = F.linear(a.transpose(1, 2).reshape(N, Q, C), layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
    ln = lambda x, i: F.layer_norm(x, (C,), layer.norms[i].weight, layer.norms[i].bias)  # noqa: E731
    x = ln(query + a, 0)
    x = ln(eager_msda(layer.cross_attn, x, pos, ref, feats), 1)
    f1, f2 = layer.ffn[0], layer.ffn[3]
    return ln(x + F.linear(F.linear(x, f1.weight, f1.bias).relu(), f2.weight, f2.bias), 2)


def queries(N=2, Q=6, ref_dim=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Q, C, generator=g, dtype=F64)
    pos = torch.randn(N, Q, C, generator=g, dtype=F64)
    ref = torch.rand(N, Q, ref_dim, generator=g, dtype=F64)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.4 + 0.05
    return q, pos, ref


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("with_pos", [True, False])
def test_decoder_layer_equals_eager_formula(ref_dim, with_pos):
    layer = perturbed(UniKDDecoderLayer(**layer_kwargs()))
    q, pos, ref = queries(ref_dim=ref_dim)
    pos = pos if with_pos else None
    feats = maps()
    out = layer(q, ref, feats, pos)
    assert out.shape == q.shape
    torch.testing.assert_close(out, eager_layer(layer, q, ref, feats, pos), rtol=1e-10, atol=1e-10)


def test_decoder_layer_gradients_reach_every_parameter_and_input():
    layer = perturbed(UniKDDecoderLayer(**layer_kwargs()))
    q, pos, ref = queries(ref_dim=4)
    feats = [f.requires_grad_() for f in maps()]
    q.requires_grad_()
    (layer(q, ref, feats, pos) * torch.linspace(-1, 1, q.numel(), dtype=F64).view(q.shape)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in feats) and q.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- kernel vs reference
def run_twice(monkeypatch, fn):
    """fn() with kdops.ms_deform_attn (the kernel when built), then with kdops.reference's formula
    patched into the module; also counts that the patched function ran."""
    out_kernel = fn()
    calls = []

    def reference(*args):
        calls.append(1)
        return kdops.reference.ms_deform_attn(*args)

    monkeypatch.setattr(MSDA_MODULE, "ms_deform_attn", reference)
    out_ref = fn()
    assert calls, "MSDeformAttn did not call the patched op"
    return out_kernel, out_ref


def outputs_and_grads(module, run):
    module.zero_grad()
    out = run()
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=F64).view(o.shape)).sum() for o in outs)
    loss.backward()
    return [o.detach().clone() for o in outs] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["content", "positional"])
def test_ake_same_with_kernel_and_reference_msda(monkeypatch, kind):
    ake = perturbed(AdaptiveKnowledgeExtractor(kind, num_queries=5, num_classes=3, **layer_kwargs()))
    feats = maps()
    boxes = queries(Q=4, ref_dim=4)[2] if kind == "positional" else None
    run = lambda: ake(feats, boxes)[2]  # noqa: E731
    a, b = run_twice(monkeypatch, lambda: outputs_and_grads(ake, run))
    head = len(list(ake.class_embed.parameters())) + len(list(ake.bbox_embed.parameters()))
    assert len(a) == len(b) == 1 + len(list(ake.parameters())) - head  # the unused head gets no grad
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_adaptor_same_with_kernel_and_reference_msda(monkeypatch):
    ad = perturbed(UniKDAdaptor([3, 5], embed_dims=C, num_heads=M, num_points=P, ffn_dims=FFN), scale=0.1)
    feats = maps(channels=[3, 5])
    a, b = run_twice(monkeypatch, lambda: outputs_and_grads(ad, lambda: ad(feats)))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_kernel_path_is_the_compiled_one_when_built():
    if not kdops.HAS_C:
        pytest.skip("kdops._C not built: both paths are the reference")
    assert MSDA_MODULE.ms_deform_attn is kdops.ms_deform_attn


# ----------------------------------------------------------------------------- AKE
def test_content_ake_shapes_reference_and_gradients():
    ake = perturbed(AdaptiveKnowledgeExtractor("content", num_queries=5, num_classes=3, **layer_kwargs()))
    feats = maps()
    q, ref, z = ake(feats)
    assert q.shape == z.shape == (2, 5, C) and ref.shape == (2, 5, 2)
    pos = ake.query_embed.weight[:, :C]
    torch.testing.assert_close(ref[1], torch.sigmoid(pos @ ake.reference_points.weight.T + ake.reference_points.bias))
    logits, boxes = ake.predict(z, ref)
    assert logits.shape == (2, 5, 3) and boxes.shape == (2, 5, 4) and ((boxes > 0) & (boxes < 1)).all()
    (logits.sum() + boxes.sum()).backward()
    for name, p in ake.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_positional_ake_encodes_boxes_and_keeps_them_as_reference():
    ake = perturbed(AdaptiveKnowledgeExtractor("positional", num_classes=3, **layer_kwargs()))
    feats = maps()
    boxes = queries(Q=4, ref_dim=4)[2]
    q, ref = ake.generate(feats, boxes)
    assert ref is boxes and q.shape == (2, 4, C)
    # the initial queries: FC of the DETR sine encoding, C/4 dims per coordinate
    d = C // 4
    dim_t = 10000 ** (2 * (torch.arange(d) // 2) / d).to(F64)
    parts = []
    for i in range(4):
        x = boxes[..., i:i + 1] * 2 * math.pi / dim_t
        parts.append(torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], -1).flatten(-2))
    q0 = ake.box_embed(torch.cat(parts, -1))
    torch.testing.assert_close(q, ake.generator(q0, boxes, feats))
    # a query's output depends on its own box
    moved = boxes.clone()
    moved[0, 0, :2] += 0.1
    q2, _ = ake.generate(feats, moved)
    assert not torch.allclose(q2[0, 0], q[0, 0])


def test_fresh_prediction_head_returns_the_reference():
    """Deformable DETR's init (zero last box layer): predict(z, ref) starts at the reference."""
    ake = AdaptiveKnowledgeExtractor("positional", num_classes=3, **layer_kwargs()).double()
    boxes = queries(Q=4, ref_dim=4)[2]
    _, ref, z = ake(maps(), boxes)
    logits, pred = ake.predict(z, ref)
    torch.testing.assert_close(pred, boxes)
    torch.testing.assert_close(ake.class_embed.bias.sigmoid(), torch.full((3,), 0.01, dtype=F64))
    assert logits.shape == (2, 4, 3)


def test_documented_parameter_counts_at_defaults():
    doc = " ".join(AdaptiveKnowledgeExtractor.__doc__.split())
    num = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layer = num(UniKDDecoderLayer())
    # self-attention, deformable cross-attention, FFN, norms from the shapes
    sa = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256
    ca = 256 * 256 + 256 + 256 * 128 + 128 + 2 * (256 * 256 + 256)
    assert layer == sa + ca + (256 * 1024 + 1024 + 1024 * 256 + 256) + 3 * 512 == 1020544
    counts = {}
    for kind in ("content", "positional"):
        ake = AdaptiveKnowledgeExtractor(kind)
        head = num(ake.class_embed) + num(ake.bbox_embed)
        counts[kind] = (num(ake) - head, num(ake))
        assert f"{counts[kind][0]:,}" in doc and f"{counts[kind][1]:,}" in doc
    assert counts["content"][0] == 200 * 512 + 514 + 3 * layer
    assert counts["positional"][0] == 256 * 256 + 256 + 3 * layer
    both = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    assert re.search(f"Both AKEs: {both[0]:,} without the heads, {both[1]:,} with them", doc)


# ----------------------------------------------------------------------------- adaptor
def test_adaptor_shapes_pixel_centre_references_and_gradients(monkeypatch):
    ad = perturbed(UniKDAdaptor([3, 5], embed_dims=C, num_heads=M, num_points=P, ffn_dims=FFN), scale=0.1)
    seen = []
    forward = type(ad.layers[0].self_attn).forward

    def spy(self, query, **kw):
        seen.append((query, kw))
        return forward(self, query, **kw)

    monkeypatch.setattr(type(ad.layers[0].self_attn), "forward", spy)
    feats = [f.requires_grad_() for f in maps(channels=[3, 5])]
    out = ad(feats)
    assert [tuple(o.shape) for o in out] == [(2, C, 5, 7), (2, C, 3, 4)]
    assert len(seen) == 2
    query, kw = seen[0]
    assert kw["value"] is query and query.shape == (2, 5 * 7 + 3 * 4, C)  # deformable SELF-attention
    ref = kw["reference_points"]
    assert ref.shape == (2, 47, 2, 2)
    # pixel (y=2, x=3) of level 0 is row 2*7+3; of level 1 (y=1, x=2) row 35 + 1*4 + 2
    torch.testing.assert_close(ref[1, 17, 0], torch.tensor([3.5 / 7, 2.5 / 5], dtype=F64))
    torch.testing.assert_close(ref[0, 41, 1], torch.tensor([2.5 / 4, 1.5 / 3], dtype=F64))
    # the first layer's query is the 1x1 projection of the maps
    proj = F.conv2d(feats[1], ad.input_proj[1].weight, ad.input_proj[1].bias)
    torch.testing.assert_close(query[:, 35:].transpose(1, 2).reshape(2, C, 3, 4), proj)
    sum(o.sum() for o in out).backward()
    for name, p in ad.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stage_two_gradients_reach_student_and_adaptor_not_the_frozen_ake():
    ake = perturbed(AdaptiveKnowledgeExtractor("content", num_queries=5, num_classes=3, **layer_kwargs()))
    ake.requires_grad_(False)
    ad = perturbed(UniKDAdaptor(8, embed_dims=C, num_levels=2, num_heads=M, num_points=P, ffn_dims=FFN), 0.1)
    teacher = maps(seed=3)
    student = [f.requires_grad_() for f in maps(channels=8, seed=4)]
    with torch.no_grad():
        q, ref = ake.generate(teacher)
        z_t = ake.extract(q, ref, teacher)
    z_s = ake.extract(q, ref, ad(student))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :2] = True
    UniKDLoss()(z_s, z_t, mask)["loss_content"].backward()
    assert all(p.grad is None for p in ake.parameters())
    assert all(p.grad is not None for p in ad.parameters()) and all(f.grad.abs().sum() > 0 for f in student)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="`kind`"):
        AdaptiveKnowledgeExtractor("both")
    with pytest.raises(ValueError, match="`embed_dims`"):
        AdaptiveKnowledgeExtractor("positional", embed_dims=12, num_heads=4)
    with pytest.raises(TypeError, match="`num_queries`"):
        AdaptiveKnowledgeExtractor(num_queries=2.0)
    with pytest.raises(ValueError, match="`embed_dims`"):
        UniKDDecoderLayer(embed_dims=10, num_heads=4)
    with pytest.raises(ValueError, match="`num_levels`"):
        UniKDAdaptor([8, 8], num_levels=3)
    ake = AdaptiveKnowledgeExtractor("content", num_queries=5, num_classes=3, **layer_kwargs()).double()
    feats = maps()
    with pytest.raises(ValueError, match="`features`"):
        ake.generate(feats[:1])
    with pytest.raises(TypeError, match="`features`"):
        ake.generate(feats[0])
    with pytest.raises(ValueError, match="`features`"):
        ake.generate(maps(channels=8))
    with pytest.raises(ValueError, match="`boxes`"):
        ake.generate(feats, torch.rand(2, 3, 4, dtype=F64))
    pos = AdaptiveKnowledgeExtractor("positional", num_classes=3, **layer_kwargs()).double()
    with pytest.raises(TypeError, match="`boxes`"):
        pos.generate(feats)
    with pytest.raises(ValueError, match="`boxes`"):
        pos.generate(feats, torch.rand(2, 3, 2, dtype=F64))
    with pytest.raises(TypeError, match="`boxes`"):
        pos.generate(feats, torch.rand(2, 3, 4))
    q, ref = ake.generate(feats)
    with pytest.raises(ValueError, match="`reference_points`"):
        ake.extract(q, ref[:, :3], feats)
    with pytest.raises(ValueError, match="`query`"):
        ake.extract(q[..., :8], ref, feats)
    ad = UniKDAdaptor([3, 5], embed_dims=C, num_heads=M, num_points=P, ffn_dims=FFN).double()
    with pytest.raises(ValueError, match=r"`features\[1\]`"):
        ad(maps(channels=[3, 4]))
