"""Reference of kdops.nms_mask: greedy NMS per group as an eager float64 IoU matrix and a Python loop.

Written from torchvision's CPU ``nms`` kernel (``csrc/ops/cpu/nms_kernel.cpp``): the same IoU
expression term for term, with ``torch.where`` standing for its ``std::max`` / ``std::min`` so that
NaN coordinates behave as there (``std::max(a, b)`` is ``a`` unless ``a < b``), and the same greedy
order. It is the oracle of the kernels' tests and the fallback on devices with no kernel. It favours
clarity: the (G,K,K) suppression matrix (bool, built from float64 IoUs a block of rows at a time),
then one step per candidate.
"""
from __future__ import annotations

from typing import Optional

import torch

#: elements of the (G, rows, K) float64 IoU block computed at a time
_BLOCK = 1 << 22


def _max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::max(a, b): b if a < b, else a (a NaN in b is dropped, a NaN in a kept)."""
    return torch.where(a < b, b, a)


def _min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """std::min(a, b): b if b < a, else a."""
    return torch.where(b < a, b, a)


def pairwise_iou(boxes_i: torch.Tensor, boxes_j: torch.Tensor) -> torch.Tensor:
    """(G, I, J) float64 IoU of every box of ``boxes_i`` (G,I,4) (the kept box, torchvision's i) with
    every box of ``boxes_j`` (G,J,4) (torchvision's j), torchvision's CPU formula term for term."""
    bi, bj = boxes_i.double(), boxes_j.double()
    ix1, iy1, ix2, iy2 = (t[:, :, None] for t in bi.unbind(2))
    jx1, jy1, jx2, jy2 = (t[:, None, :] for t in bj.unbind(2))
    iarea = (ix2 - ix1) * (iy2 - iy1)
    jarea = (jx2 - jx1) * (jy2 - jy1)
    xx1 = _max(ix1, jx1)
    yy1 = _max(iy1, jy1)
    xx2 = _min(ix2, jx2)
    yy2 = _min(iy2, jy2)
    zero = torch.zeros((), dtype=torch.float64, device=bi.device)
    w = _max(zero, xx2 - xx1)
    h = _max(zero, yy2 - yy1)
    inter = w * h
    return inter / (iarea + jarea - inter)


def nms_mask(boxes: torch.Tensor, iou_threshold: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(G,K) bool keep mask: keep[g,i] = valid[g,i] and no j < i has keep[g,j] and
    IoU(box[g,j], box[g,i]) > iou_threshold (torchvision's nms on each group's valid boxes, in order)."""
    G, K = boxes.shape[0], boxes.shape[1]
    valid = torch.ones(G, K, dtype=torch.bool, device=boxes.device) if valid is None else valid.bool()
    if G * K == 0:
        return torch.zeros(G, K, dtype=torch.bool, device=boxes.device)
    later = torch.ones(K, K, dtype=torch.bool, device=boxes.device).triu(1)  # j > i
    over = torch.zeros(G, K, K, dtype=torch.bool, device=boxes.device)  # i suppresses j if i is kept
    rows = max(1, _BLOCK // (G * K))
    for r in range(0, K, rows):  # a block of rows against the columns from its first row on
        over[:, r:r + rows, r:] = (pairwise_iou(boxes[:, r:r + rows], boxes[:, r:]) > iou_threshold) \
            & later[r:r + rows, r:]
    suppressed = ~valid
    keep = torch.zeros(G, K, dtype=torch.bool, device=boxes.device)
    for i in range(K):
        keep[:, i] = ~suppressed[:, i]
        suppressed = suppressed | (over[:, i] & keep[:, i, None])
    return keep
