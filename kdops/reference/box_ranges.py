"""Reference of kdops.box_ranges: each rule written as its authors test a pixel (LGD's
get_inside_gt_mask, FGD's mask slices, the pixel-centre rule), giving a dense (K,H,W) 0/1 mask
per level from which the ranges are read off. O(K*H*W) memory: an oracle, not a kernel. The
dense masks are also the oracle of box_pool, box_paint and box_masks."""
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
