"""Reference of kdops.box_masks: FGD's mask loop (per image, per box, slice assignment)."""
from __future__ import annotations

import math

import torch


def box_masks(boxes, batch_index, sizes, strides, *, rule="fgd", image_size=None, mode="fgd", dtype=None):
    """FGD: fg = max over boxes of 1/area on each box's slice; bg = 1 - [fg > 0], normalised.

    Written for rule="fgd" (the authors' floor/ceil slices, `image_size` a (h, w) pair or
    None for x/stride); other rules go through the dense masks of reference.box_pool.
    """
    from .box_pool import box_mask_dense

    is_seq = not isinstance(sizes[0], int)
    sizes = list(sizes) if is_seq else [sizes]
    strides = strides if isinstance(strides, (list, tuple)) else [strides]
    dtype = dtype or torch.float32
    fgs, bgs = [], []
    for (N, H, W), s in zip(sizes, strides):
        fg = torch.zeros(N, H, W, dtype=torch.float64)
        for k in range(boxes.shape[0]):
            n = int(batch_index[k])
            if not 0 <= n < N:
                continue
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            if rule == "fgd":
                if image_size is None:
                    wmin, wmax, hmin, hmax = (math.floor(x1 / s), math.ceil(x2 / s), math.floor(y1 / s),
                                              math.ceil(y2 / s))
                else:
                    ih, iw = image_size
                    wmin, wmax = math.floor(x1 / iw * W), math.ceil(x2 / iw * W)
                    hmin, hmax = math.floor(y1 / ih * H), math.ceil(y2 / ih * H)
                area = (hmax + 1 - hmin) * (wmax + 1 - wmin)
                w = 1.0 / area if mode == "fgd" else 1.0
                sl = fg[n, max(hmin, 0):max(hmax + 1, 0), max(wmin, 0):max(wmax + 1, 0)]
                sl.copy_(torch.maximum(sl, torch.tensor(w, dtype=torch.float64)))
            else:
                m = box_mask_dense(boxes[k:k + 1], (H, W), s, rule, image_size)[0]
                if mode == "fgd":
                    raise NotImplementedError("the FGD weights are defined for rule='fgd' here")
                fg[n] = torch.maximum(fg[n], m)
        bg = (fg == 0).double()
        if mode == "fgd":
            for n in range(N):
                if bg[n].sum():
                    bg[n] /= bg[n].sum()
        fgs.append(fg.to(dtype))
        bgs.append(bg.to(dtype))
    return (fgs, bgs) if is_seq else (fgs[0], bgs[0])
