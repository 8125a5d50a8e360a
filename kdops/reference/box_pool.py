"""References of kdops.box_pool / box_paint: dense per-box masks.

Each rule is written as its authors test a pixel (LGD's get_inside_gt_mask, FGD's mask
slices, the pixel-centre rule), giving a (K,H,W) 0/1 mask per level; pooling and
painting are then per-image mask products -- what LGD's code does. O(K·H·W) memory:
an oracle and a baseline, not a kernel.
"""
from __future__ import annotations

import torch

from .box_ranges import box_mask_dense
from .._dtype import acc_dtype


def _masks_from_ranges(ranges, H, W, device):
    xs, ys = torch.arange(W, device=device), torch.arange(H, device=device)
    x0, y0, x1, y1 = (v[:, None] for v in ranges.unbind(1))
    return (((y0 <= ys) & (ys <= y1))[:, :, None] & ((x0 <= xs) & (xs <= x1))[:, None, :])


def box_pool_ranges(feature, ranges, batch_index, mean):
    """Per-image mask matmul: out[k] = sum_{hw} m_k feature[b_k] (a Python loop over images)."""
    N, C, H, W = feature.shape
    acc = acc_dtype(feature)
    m = _masks_from_ranges(ranges, H, W, feature.device).to(acc).flatten(1)  # (K,HW)
    out = feature.new_zeros((ranges.shape[0], C), dtype=acc)
    for n in range(N):
        sel = batch_index == n
        out[sel] = m[sel] @ feature[n].to(acc).flatten(1).t()
    if mean:
        out = out / m.sum(1, keepdim=True).clamp(min=1)
    return out.to(feature.dtype)


def box_paint_ranges(values, ranges, batch_index, size, mean):
    N, H, W = size
    acc = acc_dtype(values)
    m = _masks_from_ranges(ranges, H, W, values.device).to(acc).flatten(1)
    v = values.to(acc)
    if mean:
        v = v / m.sum(1, keepdim=True).clamp(min=1)
    out = values.new_zeros((N, values.shape[1], H * W), dtype=acc)
    for n in range(N):
        sel = batch_index == n
        out[n] = v[sel].t() @ m[sel]
    return out.view(N, values.shape[1], H, W).to(values.dtype)


def _levels(x):
    return ([x], False) if isinstance(x, torch.Tensor) else (list(x), True)


def box_pool(features, boxes, batch_index, strides, *, rule="center", image_size=None, reduce="sum"):
    """LGD-style pooling: dense masks per level, then a per-image mask matmul."""
    feats, is_seq = _levels(features)
    strides = strides if isinstance(strides, (list, tuple)) else [strides]
    outs = []
    for f, s in zip(feats, strides):
        N, C, H, W = f.shape
        m = box_mask_dense(boxes, (H, W), s, rule, image_size).to(f.dtype).flatten(1)
        out = f.new_zeros((boxes.shape[0], C))
        for n in range(N):
            sel = batch_index == n
            out = out.index_put((sel.nonzero().squeeze(1),), m[sel] @ f[n].flatten(1).t())
        if reduce == "mean":
            out = out / m.sum(1, keepdim=True).clamp(min=1)
        outs.append(out)
    return torch.stack(outs) if is_seq else outs[0]


def box_paint(values, boxes, batch_index, sizes, strides, *, rule="center", image_size=None):
    is_seq = not isinstance(sizes[0], int)
    sizes = list(sizes) if is_seq else [sizes]
    strides = strides if isinstance(strides, (list, tuple)) else [strides]
    outs = []
    for lvl, ((N, H, W), s) in enumerate(zip(sizes, strides)):
        v = values if values.dim() == 2 else values[lvl]
        m = box_mask_dense(boxes, (H, W), s, rule, image_size).to(v.dtype).flatten(1)
        out = v.new_zeros((N, v.shape[1], H * W))
        for n in range(N):
            sel = batch_index == n
            out[n] = v[sel].t() @ m[sel]
        outs.append(out.view(N, -1, H, W))
    return outs if is_seq else outs[0]


