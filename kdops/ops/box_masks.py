r"""kdops.box_masks: FGD / FGFI / DeFeat foreground and background masks from GT boxes.

Built on the boxes' device with tensor ops only -- no Python loop over boxes, no host
synchronisation, no per-box H×W mask. The foreground weight of a pixel is a *maximum*
over the boxes covering it, which difference arrays (sums) cannot express; it is
computed with a 2-D sparse table instead: a box of h×w pixels is exactly covered by the
four (possibly overlapping) 2^⌊log2 h⌋ × 2^⌊log2 w⌋ blocks at its corners, so each box
writes 4 entries with ``scatter_reduce(amax)`` (order-free, hence deterministic), and
log2(H)+log2(W) shifted-maximum passes (each over all block heights at once) push the
blocks down to pixels. Cost
O(N·H·W·log H·log W + K) per level; the table holds (⌊log2 H⌋+1)(⌊log2 W⌋+1) maps of
(N,H,W) (56 for a 100×152 level).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import parse_sizes, per_level_numbers
from .box_ranges import ImageSize, _check_rule, all_level_ranges, check_boxes

OP = "box_masks"


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2 v) of positive int64 values."""
    j = torch.floor(torch.log2(v.double())).long()
    j = torch.where(_pow2(j + 1) <= v, j + 1, j)
    return torch.where(_pow2(j) > v, j - 1, j)


def _pow2(j: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones_like(j), j)


def _max_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(torch.maximum(dst, src))


def max_paint(ranges: torch.Tensor, weight: torch.Tensor, batch_index: torch.Tensor, size, dtype) -> torch.Tensor:
    """out[n,y,x] = max(0, max of weight[k] over boxes k of image n whose range covers (y,x))."""
    N, H, W = size
    if N * H * W == 0:
        return torch.zeros((N, H, W), dtype=dtype, device=ranges.device)
    LY, LX = H.bit_length(), W.bit_length()
    x0, y0, x1, y1 = ranges.unbind(1)
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


def box_masks(
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    sizes,
    strides,
    *,
    rule: str = "fgd",
    image_size: ImageSize = None,
    mode: str = "fgd",
    dtype: Optional[torch.dtype] = None,
):
    r"""Foreground / background pixel masks of GT boxes on each FPN level.

    - ``mode="fgd"`` (FGD, Yang et al., CVPR 2022): :math:`M_{fg}[n,y,x] = \max_k 1/A_k`
      over the boxes k of image n covering (y, x), with :math:`A_k` the box's area in
      feature pixels as FGD counts it ((y_hi+1-y_lo)(x_hi+1-x_lo) of the *unclipped*
      range of ``rule``); :math:`M_{bg} = 1` where no box covers, divided by its sum per
      image (left as is when the whole image is foreground).
      Equal to FGD's loop up to float rounding of 1/A (FGD divides twice in float32); GT
      boxes lie inside the image there -- a box starting left of / above the map, whose
      negative slice start FGD would wrap around, is clipped here instead.
    - ``mode="binary"`` (FGFI / DeFeat style): :math:`M_{fg} = 1` where a box covers,
      :math:`M_{bg} = 1 - M_{fg}`.

    Feed them to the fused loss as a pixel weight, e.g. FGD's feature term (with its
    spatial attention ``A_s`` (N,H,W) and channel attention ``A_c`` (N,C) per level)::

        fg, bg = kdops.box_masks(gt, batch, [f.shape[:1] + f.shape[2:] for f in feats], strides,
                                 image_size=(img_h, img_w))
        loss = kdops.masked_mse(s, t, pixel_weight=[(alpha * f + beta * b) * a
                                                    for f, b, a in zip(fg, bg, A_s)],
                                channel_weight=A_c) / N

    (FGD sums alpha·fg and beta·bg terms separately, each a summed MSE divided by the
    batch size N, with the teacher's attention on both maps; both share (s - t)^2, so one
    weighted MSE with the summed weight is the same loss.)

    Args:
        boxes: (K,4) xyxy in image pixels; batch_index: (K,) int64 (out-of-range boxes
            are ignored).
        sizes: (N,H,W) for one level or a sequence of L such sizes.
        strides: one per level. rule, image_size: see :func:`kdops.box_ranges`
            (FGD uses rule="fgd" with image_size = the unpadded image (height, width)).
        mode: "fgd" or "binary". dtype: of the masks (default float32).

    Returns:
        (fg, bg): two (N,H,W) tensors, or two lists of L for a sequence of sizes.
    """
    levels, is_seq = parse_sizes(OP, sizes)
    check_boxes(OP, boxes, batch_index)
    st = per_level_numbers(OP, "strides", strides, len(levels), is_seq)
    img = _check_rule(OP, rule, image_size, boxes)
    if mode not in ("fgd", "binary"):
        raise ValueError(f"kdops.{OP}: `mode` must be 'fgd' or 'binary', got {mode!r}")
    dtype = dtype or torch.float32
    fgs, bgs = [], []
    hw = [(H, W) for _, H, W in levels]
    ranges = all_level_ranges(boxes, hw, st, rule, img)
    unclipped = all_level_ranges(boxes, hw, st, rule, img, clip=False) if mode == "fgd" else ranges
    for (N, H, W), r, u in zip(levels, ranges, unclipped):
        if mode == "fgd":
            area = ((u[:, 2] - u[:, 0] + 1).clamp(min=0) * (u[:, 3] - u[:, 1] + 1).clamp(min=0)).double()
            weight = torch.where(area > 0, 1.0 / area.clamp(min=1), 0.0)
        else:
            weight = torch.ones(boxes.shape[0], dtype=torch.float64, device=boxes.device)
        fg = max_paint(r, weight, batch_index, (N, H, W), dtype)
        bg = (fg == 0).to(dtype)
        if mode == "fgd":
            total = bg.sum((1, 2), keepdim=True)
            bg = torch.where(total > 0, bg / total.clamp(min=1), bg)
        fgs.append(fg)
        bgs.append(bg)
    return (fgs, bgs) if is_seq else (fgs[0], bgs[0])
