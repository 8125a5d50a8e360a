"""Reference of kdops.box_masks: FGD's mask loop (per image, per box, slice assignment), the
test oracle and bench baseline; and ``box_masks_fwd``, the torch-ops fallback of the
kdops::box_masks_fwd kernel on devices without one."""
from __future__ import annotations

import math

import torch


def box_masks(boxes, batch_index, sizes, strides, *, rule="fgd", image_size=None, mode="fgd", dtype=None):
    """FGD: fg = max over boxes of 1/area on each box's slice; bg = 1 - [fg > 0], normalised.

    Written for rule="fgd" (the authors' floor/ceil slices, `image_size` a (h, w) pair or
    None for x/stride); other rules go through the dense masks of reference.box_pool.
    """
    from .box_ranges import box_mask_dense

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


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2 v) of positive int64 values."""
    j = torch.floor(torch.log2(v.double())).long()
    j = torch.where(_pow2(j + 1) <= v, j + 1, j)
    return torch.where(_pow2(j) > v, j - 1, j)


def _pow2(j: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones_like(j), j)


def _max_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(torch.maximum(dst, src))


def box_masks_fwd(ranges: torch.Tensor, weight: torch.Tensor, batch_index: torch.Tensor, size,
                         dtype) -> torch.Tensor:
    """out[n,y,x] = max(0, max of weight[k] over boxes k of image n whose range covers (y,x)).

    The contract of kdops::box_masks_fwd in torch ops only (any device, no host sync, no loop
    over boxes): the fallback of kdops.box_masks on devices without a kernel. Ranges are
    clipped to the map; boxes with weight <= 0, empty ranges or an out-of-range batch index
    are skipped. A 2-D sparse
    table: a box of h×w pixels is exactly covered by the four (possibly overlapping)
    2^⌊log2 h⌋ × 2^⌊log2 w⌋ blocks at its corners, so each box writes 4 entries with
    ``scatter_reduce(amax)`` (order-free, hence deterministic), and log2(H)+log2(W)
    shifted-maximum passes (each over all block heights at once) push the blocks down to
    pixels. O(N·H·W·log H·log W + K); the table holds (⌊log2 H⌋+1)(⌊log2 W⌋+1) maps of
    (N,H,W) (56 for a 100×152 level).
    """
    N, H, W = size
    if N * H * W == 0:
        return torch.zeros((N, H, W), dtype=dtype, device=ranges.device)
    LY, LX = H.bit_length(), W.bit_length()
    x0, y0, x1, y1 = ranges.unbind(1)
    x0, y0, x1, y1 = x0.clamp(min=0), y0.clamp(min=0), x1.clamp(max=W - 1), y1.clamp(max=H - 1)
    ok = (x0 <= x1) & (y0 <= y1) & (batch_index >= 0) & (batch_index < N) & (weight > 0)
    h = torch.where(ok, y1 - y0 + 1, 1)
    w = torch.where(ok, x1 - x0 + 1, 1)
    jy, jx = _floor_log2(h), _floor_log2(w)
    ys = torch.stack([y0, y0, y1 - _pow2(jy) + 1, y1 - _pow2(jy) + 1], 1)
    xs = torch.stack([x0, x1 - _pow2(jx) + 1, x0, x1 - _pow2(jx) + 1], 1)
    n = batch_index.clamp(0, N - 1)[:, None]
    idx = ((((jy * LX + jx)[:, None] * N + n) * H + ys) * W + xs)
    idx = torch.where(ok[:, None], idx, 0).reshape(-1)
    src = torch.where(ok, weight.to(dtype), 0)[:, None].expand(-1, 4).reshape(-1)
    table = torch.zeros(LY * LX * N * H * W, dtype=dtype, device=ranges.device)
    table.scatter_reduce_(0, idx, src, "amax")
    t = table.view(LY, LX, N, H, W)
    for b in range(LX - 1, 0, -1):  # blocks 2^a x 2^b -> 2^a x 1, all heights a at once
        half = 1 << (b - 1)
        _max_into(t[:, b - 1], t[:, b])
        _max_into(t[:, b - 1, :, :, half:], t[:, b, :, :, : W - half])
    for a in range(LY - 1, 0, -1):  # 2^a x 1 -> 1 x 1
        half = 1 << (a - 1)
        _max_into(t[a - 1, 0], t[a, 0])
        _max_into(t[a - 1, 0, :, half:], t[a, 0, :, : H - half])
    return t[0, 0].clone()
