r"""kdops.box_masks: FGD / FGFI / DeFeat foreground and background masks from GT boxes.

FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022;
``mmdet/distillation/losses/fgd.py``, ``FeatureLoss.forward``) builds, per image n and FPN
level, with :math:`R_k = [x^0_k, x^1_k] \times [y^0_k, y^1_k]` the inclusive feature-pixel
range of GT box k (:func:`kdops.box_ranges`, rule "fgd") and :math:`A_k` its area,

.. math::
    M_{fg}[n,y,x] = \max\bigl(0, \max_{k:\, b_k = n,\ (y,x) \in R_k} 1/A_k\bigr), \qquad
    M_{bg}[n] = \frac{[M_{fg}[n] = 0]}{\sum_{y,x} [M_{fg}[n] = 0]}

(FGD's loop over images and boxes: ``Mask_fg[i][hmin:hmax+1, wmin:wmax+1] =
torch.maximum(Mask_fg[i][...], area)``). FGFI / DeFeat use the binary union
(:math:`1/A_k` replaced by 1, :math:`M_{bg} = 1 - M_{fg}`).

The max-paint :math:`M_{fg}` is the op ``kdops::box_masks_fwd`` (schema in csrc/ops.cpp);
no Python loop over boxes, no host synchronisation, no per-box H×W mask:

- CPU (C++): per image, boxes sorted by weight (largest first, ties by index) paint only the
  pixels not painted yet, skipping painted runs with a per-row "next unpainted column"
  union-find: the first paint is the max, so the result is exact and order-free;
  O(H·W + Σ box heights) per image, parallel over (image, row block), bitwise reproducible
  for any thread count.
- CUDA (Triton): one program per (box, row block) ``tl.atomic_max``-es the weight into a
  zero-filled float32 buffer (max is exact and order-independent, so bitwise deterministic).
- Elsewhere: a torch-ops 2-D sparse table (:func:`kdops.reference.box_masks_fwd`),
  O(N·H·W·log H·log W).

Masks are not differentiable (no autograd formula; FGD treats them as constants); the op
has a fake kernel, so ``torch.compile(fullgraph=True)`` traces it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._dtype import acc_dtype
from ._registry import register_op, use_kernel
from ._validation import check_dtype, parse_sizes, per_level_numbers
from .box_ranges import ImageSize, _check_rule, all_level_ranges, check_box_tensors

OP = "box_masks"


def max_paint(ranges: torch.Tensor, weight: torch.Tensor, batch_index: torch.Tensor, size, dtype) -> torch.Tensor:
    """out[n,y,x] = max(0, max of weight[k] over boxes k of image n whose range covers (y,x)):
    kdops::box_masks_fwd where the device has a kernel, else the torch sparse table."""
    N, H, W = size
    if use_kernel(OP, ranges.device):
        return torch.ops.kdops.box_masks_fwd(ranges, weight, batch_index, N, H, W, dtype)
    return reference.box_masks_fwd(ranges, weight, batch_index, (N, H, W), dtype)


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
    check_box_tensors(OP, boxes, batch_index)
    st = per_level_numbers(OP, "strides", strides, len(levels), is_seq)
    img = _check_rule(OP, rule, image_size, boxes)
    if mode not in ("fgd", "binary"):
        raise ValueError(f"kdops.{OP}: `mode` must be 'fgd' or 'binary', got {mode!r}")
    dtype = check_dtype(OP, "dtype", dtype) or torch.float32
    acc = acc_dtype(dtype)
    fgs, bgs = [], []
    hw = [(H, W) for _, H, W in levels]
    # (L,K,4) unclipped ranges: the kernels clip them to each map (and skip empty ones) themselves;
    # boxes with a NaN coordinate get weight 0 (box_ranges' clipped ranges mark them empty).
    ranges = all_level_ranges(boxes, hw, st, rule, img, clip=False)
    valid = ~boxes.isnan().any(1)
    if mode == "fgd":  # 1 / area of the unclipped range, every level at once (float64: no overflow)
        u = ranges.double()
        area = (u[..., 2] - u[..., 0] + 1).clamp(min=0) * (u[..., 3] - u[..., 1] + 1).clamp(min=0)
        weights = torch.where(valid & (area > 0), 1.0 / area.clamp(min=1), 0.0)
    else:
        weights = valid.double().expand(len(levels), -1)
    for l, (N, H, W) in enumerate(levels):
        fg = max_paint(ranges[l], weights[l], batch_index, (N, H, W), dtype)
        if mode == "fgd":  # 1 / (uncovered pixels of the image) there (0 everywhere if none)
            bg = (fg == 0).to(acc)
            bg = (bg / bg.sum((1, 2), keepdim=True).clamp(min=1)).to(dtype)
        else:
            bg = (fg == 0).to(dtype)
        fgs.append(fg)
        bgs.append(bg)
    return (fgs, bgs) if is_seq else (fgs[0], bgs[0])


def _fake_max_paint(ranges, weight, batch_index, N, H, W, dtype):
    return ranges.new_empty((N, H, W), dtype=dtype)


# No autograd: the masks are built from integer box ranges and constant weights (FGD treats
# them as constants), so kdops::box_masks_fwd is not differentiable.
register_op(OP, fake={"box_masks_fwd": _fake_max_paint})
