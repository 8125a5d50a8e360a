"""References of kdops.box_pool / box_paint / box_ranges: dense per-box masks.

Each rule is written as its authors test a pixel (LGD's get_inside_gt_mask, FGD's mask
slices, the pixel-centre rule), giving a (K,H,W) 0/1 mask per level; pooling and
painting are then per-image mask products -- what LGD's code does. O(K·H·W) memory:
an oracle and a baseline, not a kernel.
"""
from __future__ import annotations


import torch


def box_mask_dense(boxes, size, stride, rule="center", image_size=None):
    """(K,H,W) 0/1 float64 masks of one level, from each rule's own pixel test."""
    H, W = size
    b = boxes.double()
    x1, y1, x2, y2 = (v[:, None] for v in b.unbind(1))
    xs = torch.arange(W, dtype=torch.float64, device=boxes.device)[None]
    ys = torch.arange(H, dtype=torch.float64, device=boxes.device)[None]
    img_h, img_w = (None, None) if image_size is None else image_size
    if isinstance(img_w, torch.Tensor):
        img_h, img_w = img_h.double()[:, None], img_w.double()[:, None]
    if rule == "center":
        cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
        inx, iny = (x1 < cx) & (cx < x2), (y1 < cy) & (cy < y2)
    elif rule == "lgd":
        # LGD: boxes scaled by r = dst / src; |centre - coord| / extent <= 0.5 per axis
        rw = 1.0 / stride if img_w is None else W / img_w
        rh = 1.0 / stride if img_h is None else H / img_h
        bx1, bx2, by1, by2 = x1 * rw, x2 * rw, y1 * rh, y2 * rh
        with torch.no_grad():
            dx = (torch.abs((bx1 + bx2) * 0.5 - xs) / (bx2 - bx1))
            dy = (torch.abs((by1 + by2) * 0.5 - ys) / (by2 - by1))
        inx, iny = (dx <= 0.5) & (bx2 > bx1), (dy <= 0.5) & (by2 > by1)
    elif rule == "fgd":
        # FGD: Mask[hmin:hmax+1, wmin:wmax+1] with wmin = floor(x1 / img_w * W), wmax = ceil(...)
        if img_w is None:
            wmin, wmax = torch.floor(x1 / stride), torch.ceil(x2 / stride)
            hmin, hmax = torch.floor(y1 / stride), torch.ceil(y2 / stride)
        else:
            wmin, wmax = torch.floor(x1 / img_w * W), torch.ceil(x2 / img_w * W)
            hmin, hmax = torch.floor(y1 / img_h * H), torch.ceil(y2 / img_h * H)
        inx, iny = (wmin <= xs) & (xs <= wmax), (hmin <= ys) & (ys <= hmax)
    else:
        raise ValueError(rule)
    return (iny[:, :, None] & inx[:, None, :]).double()


def box_ranges(boxes, feature_sizes, strides, rule="center", image_size=None):
    """(L,K,4) inclusive ranges read off the dense masks ([1,1,0,0] when empty)."""
    out = []
    for (H, W), s in zip([tuple(f)[-2:] for f in feature_sizes], strides):
        m = box_mask_dense(boxes, (H, W), s, rule, image_size).bool()
        r = []
        for k in range(boxes.shape[0]):
            ys, xs = m[k].any(1).nonzero().squeeze(1), m[k].any(0).nonzero().squeeze(1)
            r.append([xs.min(), ys.min(), xs.max(), ys.max()] if ys.numel() and xs.numel() else [1, 1, 0, 0])
        out.append(torch.tensor(r, dtype=torch.int64).reshape(-1, 4))
    return torch.stack(out).to(boxes.device)


def _masks_from_ranges(ranges, H, W, device):
    xs, ys = torch.arange(W, device=device), torch.arange(H, device=device)
    x0, y0, x1, y1 = (v[:, None] for v in ranges.unbind(1))
    return (((y0 <= ys) & (ys <= y1))[:, :, None] & ((x0 <= xs) & (xs <= x1))[:, None, :])


def box_pool_ranges(feature, ranges, batch_index, mean):
    """Per-image mask matmul: out[k] = sum_{hw} m_k feature[b_k] (a Python loop over images)."""
    N, C, H, W = feature.shape
    acc = torch.float64 if feature.dtype == torch.float64 else torch.float32
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
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
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


