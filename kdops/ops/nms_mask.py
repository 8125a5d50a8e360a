r"""kdops.nms_mask: exact greedy NMS with a fixed-shape keep mask (no host synchronisation).

HEAD's assistant picks its proposals with NMS every step. torchvision's ``nms`` returns a
data-dependent number of indices and, on CUDA, copies its suppression mask to the host: the step
waits for the GPU there, and torch.compile cannot trace through it. ``kdops.nms_mask`` answers the
same question with a (G,K) boolean mask of the input's shape, for G independent groups at once
(images x FPN levels, or images with torchvision's ``batched_nms`` offsets left out).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._registry import register_op, use_kernel
from ._validation import check_number, check_tensor

OP = "nms_mask"

__all__ = ["nms_mask"]


def nms_mask(boxes: torch.Tensor, iou_threshold: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Greedy non-maximum suppression of G groups of K candidates, as a (G,K) keep mask.

    Each group's candidates are in priority order (decreasing score: the caller sorts). With
    :math:`v_{g,i}` the validity of candidate i (all True when ``valid`` is None),

    .. math::
        \mathrm{keep}_{g,i} = v_{g,i} \wedge \neg\,\exists\, j < i:\ \mathrm{keep}_{g,j} \wedge
        \mathrm{IoU}(b_{g,j}, b_{g,i}) > \tau

    -- exactly ``torchvision.ops.nms`` on each group's valid boxes in the given order (the kept
    indices are where the mask is True). The IoU of a kept box :math:`i` and a later box :math:`j`
    is torchvision's CPU formula term for term, in float64 from the input values:
    :math:`a = (x_2 - x_1)(y_2 - y_1)`,
    :math:`w = \max(0, \min(x_2^i, x_2^j) - \max(x_1^i, x_1^j))`, :math:`h` likewise,
    :math:`\mathrm{IoU} = wh / (a_i + a_j - wh)`; j is suppressed iff :math:`\mathrm{IoU} > \tau`.

    Invalid candidates are neither kept nor suppress anything. Degenerate boxes (x2 < x1 or
    y2 < y1) intersect nothing (w or h is 0) and have a zero or negative area; their IoU with a box
    is 0 (or NaN, see below) unless the area terms cancel, exactly as in torchvision. Non-finite
    values follow the formula as torchvision's CPU kernel evaluates it (its ``std::max`` /
    ``std::min`` argument order is kept): a NaN coordinate makes the box's area NaN, so every IoU
    it takes part in is NaN, which is not above the threshold -- such a box is kept (when valid) and
    suppresses nothing. An infinite coordinate (or an area that overflows float64) makes its IoUs
    0 or NaN (``inf/inf``, ``inf - inf``): it suppresses nothing either. torchvision's CUDA kernel
    is not the reference: it computes float32 boxes in float32 against the threshold rounded to
    float32, so it can differ at near-ties.

    Dtypes: the boxes' values (float32, float16, bfloat16 or float64) are widened to float64 before
    any arithmetic, so the result depends only on the values, never on the dtype: float16/bfloat16
    boxes give the mask torchvision gives for the same values upcast to float64 (torchvision itself
    computes in the input's dtype; on float32 boxes it may differ where an IoU rounds across the
    threshold).

    Args:
        boxes: (G,K,4) x1, y1, x2, y2, floating. ``requires_grad`` is fine: the mask has no gradient.
        iou_threshold: a finite number in [0, 1]; an IoU strictly above it suppresses (at 0.0 any
            overlap does).
        valid: None (all valid) or (G,K) bool on the boxes' device.

    Returns:
        (G,K) ``torch.bool`` on the boxes' device (an empty (G,K) mask when G or K is 0).

    Kernels: C++ on the CPU (torchvision's loop per group, groups in parallel); Triton on CUDA
    (an IoU bitmask of G*K*ceil(K/32) int32 words built in parallel, then one program per group
    scans it in order), with nothing read on the host and no atomics: deterministic, and traceable
    by ``torch.compile(fullgraph=True)``.
    """
    check_tensor(OP, "boxes", boxes, ndim=3, what="(G,K,4) x1, y1, x2, y2")
    if boxes.shape[2] != 4:
        raise ValueError(f"kdops.{OP}: `boxes` must have shape (G,K,4) x1, y1, x2, y2, got {tuple(boxes.shape)}")
    G, K = boxes.shape[0], boxes.shape[1]
    check_number(OP, "iou_threshold", iou_threshold, low=0.0, high=1.0)
    if valid is None:
        valid = torch.ones((G, K), dtype=torch.bool, device=boxes.device)
    else:
        check_tensor(OP, "valid", valid, ndim=2, dtypes=(torch.bool,), like=boxes, shape=(G, K),
                     what="(G,K) bool, the candidates that take part")
    boxes = boxes.detach()
    if not use_kernel(OP, boxes.device):
        return reference.nms_mask(boxes, float(iou_threshold), valid)
    return torch.ops.kdops.nms_mask_fwd(boxes, valid, float(iou_threshold))


def _fake_fwd(boxes, valid, iou_threshold):
    return boxes.new_empty((boxes.shape[0], boxes.shape[1]), dtype=torch.bool)


# No autograd: the output is a boolean mask (no gradient), whatever requires grad upstream.
register_op(OP, fake={"nms_mask_fwd": _fake_fwd})
