"""kdops.box_ranges: image boxes -> inclusive feature-pixel ranges, per FPN level.

Every method's box mask is an axis-aligned rectangle of whole feature pixels, so the
box kernels (box_pool, box_paint, box_masks) work on integer ranges; this module holds
every convention. On the CPU one C++ op computes them (kdops::box_ranges_fwd); elsewhere
tensor ops on the boxes' device (no host sync) give the same numbers, bitwise.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .._device import constant
from .._extension import HAS_C, debug_checks, warn_once
from ._registry import compiling, host_readable, register_op
from ._validation import check_flag, check_number, check_tensor, per_level_numbers

RULES = ("center", "lgd", "fgd")
ImageSize = Optional[Union[Tuple[int, int], torch.Tensor]]
# What _check_rule hands to all_level_ranges: None, (height, width) floats, or the (K,2) tensor.
Image = Optional[Union[Tuple[float, float], torch.Tensor]]


_NO_BATCH_INDEX = object()  # check_box_tensors called for boxes alone (box_ranges takes no batch index)


def check_box_tensors(op: str, boxes, batch_index=_NO_BATCH_INDEX, like: Optional[torch.Tensor] = None) -> None:
    check_tensor(op, "boxes", boxes, ndim=2, like=like, what="(K,4) xyxy in image pixels")
    if boxes.shape[1] != 4:
        raise ValueError(f"kdops.{op}: `boxes` must have shape (K,4) xyxy in image pixels, got {tuple(boxes.shape)}")
    if batch_index is not _NO_BATCH_INDEX:
        check_tensor(op, "batch_index", batch_index, ndim=1, dtypes=(torch.int64,), like=boxes, what="(K,)")
        if batch_index.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"kdops.{op}: `batch_index` must have shape ({boxes.shape[0]},) (one image per box), "
                f"got {tuple(batch_index.shape)}"
            )


#: what makes a GT box cover nothing, in the order check_boxes reports them
BOX_PROBLEMS = (
    "a batch index outside [0, num_images)",
    "an inverted extent (x2 < x1 or y2 < y1)",
    "a non-finite coordinate (NaN or inf)",
)


def check_boxes(boxes: torch.Tensor, batch_index: torch.Tensor, num_images: int, *,
                   strict: bool = False) -> Optional[int]:
    """Counts the GT boxes that can never cover a feature pixel, and says so. Public as
    ``kdops.check_boxes``; the box-driven losses call it once per forward.

    A box covers nothing when its batch index is outside ``[0, num_images)``, its extent is
    inverted (x2 < x1 or y2 < y1), or a coordinate is NaN or infinite. The kernels stay
    bounds-safe and simply skip such boxes (they get zero weight), so a data-pipeline bug would
    otherwise go unnoticed.

    Args:
        boxes: (K,4) xyxy in image pixels; batch_index: (K,) int64, the image of each box.
        num_images: N, the batch size (int >= 0).
        strict: raise ``ValueError`` naming the count and the reason instead of warning.

    Returns:
        The number of boxes that cover nothing, or None when the check did not run.

    Where it runs: on tensors the host can read (CPU, outside ``torch.compile`` tracing) it
    costs three small reductions and one read of three numbers. On GPU tensors it would need a
    device synchronisation, so it does nothing unless ``KDOPS_DEBUG_CHECKS=1`` is set -- then
    it runs there too and synchronises the stream once per call (a debugging mode, not for
    training speed). On fake / meta tensors and while tracing it never runs.

    By default each reason warns once per process (``RuntimeWarning``) with the count of the
    call that found it: "kdops.check_boxes: 3 of 40 boxes have an inverted extent ...".
    """
    op = "check_boxes"
    check_box_tensors(op, boxes, batch_index, None)
    num_images = check_number(op, "num_images", num_images, low=0, integer=True)
    check_flag(op, "strict", strict)
    if compiling(boxes, batch_index):
        return None
    if not (host_readable(boxes) and host_readable(batch_index)) and not debug_checks():
        return None
    with torch.no_grad():
        b = boxes.detach()
        bad_index = (batch_index < 0) | (batch_index >= num_images)
        inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        non_finite = ~torch.isfinite(b).all(1)
        any_bad = bad_index | inverted | non_finite
        # one host read of four numbers (a sync on a GPU: only in debug mode, see above)
        counts = torch.stack([bad_index.sum(), inverted.sum(), non_finite.sum(), any_bad.sum()]).tolist()
    K = boxes.shape[0]
    found = [(n, why) for n, why in zip(counts[:3], BOX_PROBLEMS) if n]
    if found and strict:
        what = "; ".join(f"{n} of {K} boxes have {why}" for n, why in found)
        raise ValueError(f"kdops.check_boxes: {what} (num_images={num_images}): such boxes cover no feature "
                         "pixel. Fix the targets, or pass strict=False to only warn")
    for n, why in found:
        warn_once(f"check_boxes:{why}",
                  f"kdops.check_boxes: {n} of {K} boxes have {why} (num_images={num_images}): they cover no "
                  "feature pixel and are ignored. Shown once per reason; strict=True raises instead")
    return int(counts[3])


def _check_rule(op: str, rule: str, image_size: ImageSize, boxes: torch.Tensor):
    if rule not in RULES:
        raise ValueError(f"kdops.{op}: `rule` must be one of {RULES}, got {rule!r}")
    if image_size is None:
        return None
    if isinstance(image_size, torch.Tensor):
        check_tensor(op, "image_size", image_size, ndim=2, dtypes=(torch.int64, torch.int32, torch.float32, torch.float64),
                     like=boxes, what="(K,2) (height, width) per box")
        if image_size.shape != (boxes.shape[0], 2):
            raise ValueError(f"kdops.{op}: `image_size` must be (K,2) = ({boxes.shape[0]}, 2) per box, "
                             f"got {tuple(image_size.shape)}")
        return image_size
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, (int, float)) and v > 0 for v in image_size)):
        return float(image_size[0]), float(image_size[1])
    raise ValueError(f"kdops.{op}: `image_size` must be None, (height, width) or a (K,2) tensor, got {image_size!r}")


def _axis(lo: torch.Tensor, hi: torch.Tensor, size: torch.Tensor, stride: torch.Tensor, img, rule: str,
          inv_stride: Optional[torch.Tensor]):
    """Unclipped inclusive pixel range [a, b] of one axis (float tensors of integers); lo, hi
    are (1,K) box coordinates, size and stride (L,1) per level."""
    if rule == "center":
        # x1 < (x + 0.5) s < x2 ; the estimate is corrected by one against the exact test
        a = torch.floor(lo / stride - 0.5) + 1
        a = torch.where((a - 0.5) * stride > lo, a - 1, a)
        a = torch.where((a + 0.5) * stride <= lo, a + 1, a)
        b = torch.ceil(hi / stride - 0.5) - 1
        b = torch.where((b + 1.5) * stride < hi, b + 1, b)
        b = torch.where((b + 0.5) * stride >= hi, b - 1, b)
        return a, b
    if rule == "lgd":
        # LGD get_inside_gt_mask: |x - (x1 r + x2 r)/2| / (x2 r - x1 r) <= 0.5, r = size / image
        r = inv_stride if img is None else size / img
        lo_r, hi_r = lo * r, hi * r
        a, b = torch.ceil(lo_r), torch.floor(hi_r)
        b = torch.where(hi_r - lo_r > 0, b, a - 1)  # zero-size (or inverted) boxes cover nothing
        return a, b
    # FGD: floor(x1 / image * size), ceil(x2 / image * size), divided first as the authors do
    if img is None:
        return torch.floor(lo / stride), torch.ceil(hi / stride)
    return torch.floor(lo / img * size), torch.ceil(hi / img * size)


def all_level_ranges(boxes: torch.Tensor, sizes: Sequence[Tuple[int, int]], strides: Sequence[float], rule: str,
                     img: Image, clip: bool = True) -> torch.Tensor:
    """(L,K,4) int64 [x_lo, y_lo, x_hi, y_hi] of every level (validated arguments; ``img`` as
    :func:`_check_rule` returns it). clip=False leaves the ranges unclipped: NaN -> 0, clamped
    to +-2^40 (box_masks counts FGD's areas on them).

    On the CPU one kdops::box_ranges_fwd call (~0.015 ms at K = 10, ~0.15 ms at K = 1000 on the
    COCO FPN): the tensor ops of _ranges_tensor_ops are ~40 small broadcast kernels (0.3-0.6 ms,
    1-1.5 ms); the C++ loop does their arithmetic in the same float type and order, so the
    result is bitwise the same."""
    sizes = [(int(s[-2]), int(s[-1])) for s in sizes]
    if HAS_C and boxes.device.type == "cpu":
        per_box = img if isinstance(img, torch.Tensor) else None
        img_h, img_w = (0.0, 0.0) if img is None or per_box is not None else img
        return torch.ops.kdops.box_ranges_fwd(boxes, [h for h, _ in sizes], [w for _, w in sizes],
                                              [float(s) for s in strides], rule, per_box, img_h, img_w, clip)
    return _ranges_tensor_ops(boxes, sizes, strides, rule, img, clip)


def _ranges_tensor_ops(boxes: torch.Tensor, sizes: Sequence[Tuple[int, int]], strides: Sequence[float], rule: str,
                       img: Image, clip: bool = True) -> torch.Tensor:
    """all_level_ranges in one set of tensor ops (levels broadcast along dim 0, so the cost does
    not grow with L op calls): the GPU path, and the reference of the C++ op in the tests."""
    dt = boxes.dtype if boxes.dtype in (torch.float32, torch.float64) else torch.float32
    sizes = [(int(s[-2]), int(s[-1])) for s in sizes]

    def column(values):  # (L,1): one value per level, broadcast against the (1,K) box coordinates
        return constant([[float(v)] for v in values], like=boxes, dtype=dt)

    H, W = column([h for h, _ in sizes]), column([w for _, w in sizes])
    st = column(strides)
    x1, y1, x2, y2 = boxes.to(dt).t()[:, None, :]
    if isinstance(img, torch.Tensor):
        img_h, img_w = img[:, 0].to(dt), img[:, 1].to(dt)
    else:
        img_h, img_w = (None, None) if img is None else img
    # LGD scales by 1/stride: the reciprocal is taken in float64 and rounded once to dt
    inv = column([1.0 / float(s) for s in strides]) if rule == "lgd" and img is None else None
    xa, xb = _axis(x1, x2, W, st, img_w, rule, inv)
    ya, yb = _axis(y1, y2, H, st, img_h, rule, inv)
    r = torch.stack(torch.broadcast_tensors(xa, ya, xb, yb), 2)  # (L,K,4)
    if clip:
        lim = torch.stack([W - 1, H - 1], 2)  # (L,1,2)
        a, b = r[..., :2], r[..., 2:]
        # empty (or NaN) on either axis -> the canonical empty range [1, 1, 0, 0]
        empty = ((a > b) | (b < 0) | (a > lim) | a.isnan() | b.isnan()).any(2, keepdim=True)
        r = torch.cat([torch.clamp(a, min=0), torch.minimum(b, lim)], 2)
        r = torch.where(empty, constant([1.0, 1.0, 0.0, 0.0], like=boxes, dtype=dt), r)
    else:
        r = torch.nan_to_num(r, nan=0.0).clamp(-(2.0 ** 40), 2.0 ** 40)
    return r.to(torch.int64)


def box_ranges(
    boxes: torch.Tensor,
    feature_sizes: Sequence[Sequence[int]],
    strides: Sequence[float],
    rule: str = "center",
    image_size: ImageSize = None,
) -> torch.Tensor:
    r"""Turns image boxes into inclusive feature-pixel ranges, one set per FPN level.

    Rules (pixel (y, x) of a level with stride s and size H x W):

    - ``"center"``: inside iff :math:`x_1 < (x+\tfrac12)s < x_2` and
      :math:`y_1 < (y+\tfrac12)s < y_2` (pixel centres strictly inside the box);
      ``image_size`` is not used.
    - ``"lgd"``: LGD's ``get_inside_gt_mask`` (Zhang et al., "LGD: Label-Guided
      Self-Distillation for Object Detection", AAAI 2022): with r = feature size /
      padded image size per axis (1/s when ``image_size`` is None), inside iff
      :math:`x_1 r \le x \le x_2 r` and :math:`y_1 r \le y \le y_2 r`; zero-width or
      zero-height boxes cover nothing.
    - ``"fgd"``: FGD's mask code (Yang et al., "Focal and Global Knowledge
      Distillation for Detectors", CVPR 2022): the closed range
      :math:`[\lfloor x_1/w_{img}\cdot W\rfloor, \lceil x_2/w_{img}\cdot W\rceil]` (same for y;
      ``x/s`` when ``image_size`` is None), clipped to the map.

    Args:
        boxes: (K,4) xyxy in input-image pixels (floating).
        feature_sizes: L pairs (H, W) (longer tuples use their last two entries).
        strides: L positive numbers.
        rule: "center", "lgd" or "fgd".
        image_size: None, (height, width), or a (K,2) tensor of each box's image size.

    Returns:
        (L,K,4) int64 [x_lo, y_lo, x_hi, y_hi], clipped to each map; a box that covers no
        pixel of a level gets the empty range [1, 1, 0, 0] there.
    """
    op = "box_ranges"
    check_box_tensors(op, boxes)
    if not isinstance(feature_sizes, (list, tuple)) or not feature_sizes or not all(
            isinstance(s, (list, tuple, torch.Size)) and len(s) >= 2 for s in feature_sizes):
        raise ValueError(f"kdops.{op}: `feature_sizes` must be a sequence of L (H, W) pairs, got {feature_sizes!r}")
    L = len(feature_sizes)
    st = per_level_numbers(op, "strides", strides, L, True)
    img = _check_rule(op, rule, image_size, boxes)
    return all_level_ranges(boxes, [tuple(s)[-2:] for s in feature_sizes], st, rule, img)


def _fake_ranges(boxes, heights, widths, strides, rule, image_hw, image_h, image_w, clip):
    return boxes.new_empty((len(strides), boxes.shape[0], 4), dtype=torch.int64)


# No autograd (integer ranges: boxes get no gradient through them). On CUDA the same rules run
# as tensor ops in all_level_ranges (bitwise what the C++ kernel computes), so no CUDA kernel.
register_op("box_ranges", fake={"box_ranges_fwd": _fake_ranges}, cuda=None)
