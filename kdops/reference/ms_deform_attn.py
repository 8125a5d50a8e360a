"""Reference multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021).

The formula of mmcv's ``multi_scale_deformable_attn_pytorch``: each head samples every level
with ``F.grid_sample`` (bilinear, zero padding, align_corners=False) at ``2*loc - 1`` and sums
the samples weighted by the attention weights. It reads ``spatial_shapes`` on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """(N,S,M,D), (L,2), (L,), (N,Q,M,L,P,2), (N,Q,M,L,P) -> (N,Q,M*D)."""
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (H, W) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + H * W]  # (N,HW,M,D)
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M,Q,P,2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * w).sum(-1).view(N, M * D, Q)
    return out.transpose(1, 2).contiguous()
