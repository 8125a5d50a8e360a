"""kdops.nn.MSDeformAttn: drop-in for mmcv's MultiScaleDeformableAttention.

Same constructor and forward arguments, same submodules (so the same state_dict keys:
``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``), the same
initialisation; mmcv checkpoints load unchanged. The sampling runs through
:func:`kdops.ms_deform_attn` on every device (mmcv uses its CUDA op on GPUs and the grid_sample
formula elsewhere), so it also works in bf16, deterministically and under torch.compile.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..ops import ms_deform_attn
from ..ops._registry import host_readable
from ..ops._validation import check_flag, check_index_tensor, check_number, check_tensor

OP = "MSDeformAttn"


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021).

    Args:
        embed_dims: query / value width (256).
        num_heads: attention heads M (8); embed_dims must be divisible by it.
        num_levels: feature levels L (4).
        num_points: sampling points per head and level P (4).
        im2col_step: accepted for mmcv compatibility and ignored (kdops has no batch limit).
        dropout: dropout on the output before the residual (0.1).
        batch_first: (bs, n, c) inputs when True, (n, bs, c) when False (mmcv's default).
        norm_cfg, init_cfg: accepted for mmcv compatibility (mmcv stores them; unused here).
        value_proj_ratio: width of the value projection relative to embed_dims (1.0);
            int(embed_dims * value_proj_ratio) must be a positive multiple of num_heads.

    Every constructor and forward argument is checked first (``TypeError`` for a wrong kind,
    ``ValueError`` for a wrong value, naming the argument): the integers are positive ints
    (bools refused), ``dropout`` a number in [0, 1], ``batch_first`` a bool; forward tensors
    have mmcv's shapes for this module's embed_dims and num_levels, ``spatial_shapes`` (L,2)
    and ``level_start_index`` (L,) are int64.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 im2col_step: int = 64, dropout: float = 0.1, batch_first: bool = False,
                 norm_cfg: Optional[dict] = None, init_cfg=None, value_proj_ratio: float = 1.0):
        super().__init__()
        for name, v in (("embed_dims", embed_dims), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points), ("im2col_step", im2col_step)):
            check_number(OP, name, v, low=1, integer=True)
        check_number(OP, "dropout", dropout, low=0.0, high=1.0)
        check_flag(OP, "batch_first", batch_first)
        if norm_cfg is not None and not isinstance(norm_cfg, dict):
            raise TypeError(f"{OP}: `norm_cfg` must be None or a dict, got {type(norm_cfg).__name__} {norm_cfg!r}")
        if init_cfg is not None and not isinstance(init_cfg, (dict, list)):
            raise TypeError(f"{OP}: `init_cfg` must be None, a dict or a list of dicts, got "
                            f"{type(init_cfg).__name__} {init_cfg!r}")
        check_number(OP, "value_proj_ratio", value_proj_ratio, low=0.0, low_open=True)
        if embed_dims % num_heads != 0:
            raise ValueError(f"{OP}: `embed_dims` must be divisible by num_heads, "
                             f"but got {embed_dims} and {num_heads}")
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size < num_heads or value_proj_size % num_heads:
            raise ValueError(f"{OP}: `value_proj_ratio` must make int(embed_dims * value_proj_ratio) a positive "
                             f"multiple of num_heads ({num_heads}), got {value_proj_ratio!r} -> {value_proj_size}")
        dim_per_head = embed_dims // num_heads
        if dim_per_head & (dim_per_head - 1):
            warnings.warn(f"{OP}: you'd better set embed_dims so that each head's width is a "
                          "power of 2 (as mmcv advises); kdops handles any width", stacklevel=2)
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.im2col_step = im2col_step
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmcv's initialisation: zero offsets with a bias pointing each head in its own direction
        (scaled by point index), zero attention logits, xavier-uniform projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        device = self.sampling_offsets.weight.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1)
            nn.init.constant_(lin.bias, 0.0)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, reference_points: Optional[torch.Tensor] = None,
                spatial_shapes: Optional[torch.Tensor] = None, level_start_index: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        r"""Deformable DETR's multi-scale deformable attention (Zhu et al., ICLR 2021, Eq. 2), with
        mmcv's ``MultiScaleDeformableAttention.forward`` arguments and semantics.

        Shapes (bs batch, num_query Q, num_value S = sum of H_l·W_l, C = embed_dims, L levels):

        Args:
            query: (Q, bs, C), or (bs, Q, C) with ``batch_first=True``.
            key: unused, as in mmcv.
            value: (S, bs, C) (or (bs, S, C)), the flattened levels; None: ``query``.
            identity: added to the output (residual); None: ``query``.
            query_pos: added to ``query`` before the offsets and weights are predicted.
            key_padding_mask: (bs, S) bool, True at padding (those values are zeroed).
            reference_points: (bs, Q, L, 2) normalised (x, y) in [0, 1] -- the sampling
                offsets are divided by each level's (W, H) -- or (bs, Q, L, 4) boxes
                (cx, cy, w, h), where offsets scale with the box: ``0.5·w/P``.
            spatial_shapes: (L, 2) int64 (H, W) per level; level_start_index: (L,) int64.

        Sampling is bilinear with ``align_corners=False`` (location 0 is the left edge of
        the first pixel, pixel centres at (i+0.5)/W) and zero padding, through
        :func:`kdops.ms_deform_attn`.

        Returns:
            the query-shaped output (after ``output_proj`` and dropout) + ``identity``.
        """
        self._check_forward(query, value, identity, query_pos, key_padding_mask, reference_points, spatial_shapes,
                            level_start_index)
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
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, self.value_proj.out_features // self.num_heads)
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(bs, num_query, M, L, P, 2)
        weights = self.attention_weights(query).view(bs, num_query, M, L * P).softmax(-1)
        weights = weights.view(bs, num_query, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity

    def _check_forward(self, query, value, identity, query_pos, key_padding_mask, reference_points, spatial_shapes,
                       level_start_index) -> None:
        """Kinds, ranks, shapes, dtypes and devices of every forward argument (no value is read)."""
        C, L = self.embed_dims, self.num_levels
        layout = "(bs, num_query, embed_dims)" if self.batch_first else "(num_query, bs, embed_dims)"
        check_tensor(OP, "query", query, ndim=3, what=layout)
        if query.shape[-1] != C:
            raise ValueError(f"{OP}: `query` must be {layout} with embed_dims={C}, got shape {tuple(query.shape)}")
        b = 0 if self.batch_first else 1
        bs = query.shape[b]
        if value is not None:
            vlayout = "(bs, num_value, embed_dims)" if self.batch_first else "(num_value, bs, embed_dims)"
            check_tensor(OP, "value", value, ndim=3, like=query, what=vlayout)
            if value.shape[-1] != C or value.shape[b] != bs:
                raise ValueError(f"{OP}: `value` must be {vlayout} with bs={bs} (from `query`) and embed_dims={C}, "
                                 f"got shape {tuple(value.shape)}")
            num_value = value.shape[1 - b]
        else:
            num_value = query.shape[1 - b]
        if identity is not None:
            check_tensor(OP, "identity", identity, like=query, shape=tuple(query.shape), what="(the shape of `query`)")
        if query_pos is not None:
            check_tensor(OP, "query_pos", query_pos, like=query, what="(broadcastable to `query`)")
            qs, ps = tuple(query.shape), tuple(query_pos.shape)
            ok = len(ps) <= len(qs) and all(p in (1, q) for p, q in zip(ps[::-1], qs[::-1]))
            if not ok:
                raise ValueError(f"{OP}: `query_pos` must broadcast to the shape of `query` {tuple(query.shape)}, "
                                 f"got {tuple(query_pos.shape)}")
        missing = [n for n, x in (("reference_points", reference_points), ("spatial_shapes", spatial_shapes),
                                  ("level_start_index", level_start_index)) if x is None]
        if missing:
            raise ValueError(f"{OP}: reference_points, spatial_shapes and level_start_index are required, "
                             f"got no {', '.join('`' + n + '`' for n in missing)}")
        check_tensor(OP, "reference_points", reference_points, ndim=4, like=query,
                     what="(bs, num_query, num_levels, 2 or 4)")
        num_query = query.shape[1 - b]
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"{OP}: last dim of `reference_points` must be 2 or 4, "
                             f"but got {reference_points.shape[-1]} instead.")
        if tuple(reference_points.shape[:3]) != (bs, num_query, L):
            raise ValueError(f"{OP}: `reference_points` must be (bs, num_query, num_levels, 2 or 4) = "
                             f"({bs}, {num_query}, {L}, 2 or 4), got {tuple(reference_points.shape)}")
        check_index_tensor(OP, "spatial_shapes", spatial_shapes, like=query, shape=(L, 2),
                           what="(num_levels, 2): (H, W) per level")
        check_index_tensor(OP, "level_start_index", level_start_index, like=query, shape=(L,),
                           what="(num_levels,): first value row of each level")
        if host_readable(spatial_shapes) and int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()) != num_value:
            raise ValueError(f"{OP}: `value` has {num_value} rows but `spatial_shapes` "
                             f"{spatial_shapes.tolist()} sums to a different H*W total")
        if key_padding_mask is not None:
            check_tensor(OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,), like=query,
                         shape=(bs, num_value), what="(bs, num_value), True at padding")
