"""Box decoding and aligned (G)IoU, eagerly: mmdet's DistancePointBBoxCoder, GFL's integral,
DeltaXYWHBBoxCoder and ``bbox_overlaps(..., is_aligned=True)``. The oracles of every op that
decodes boxes (BCKD's localisation today; HEAD and UniKD next). The fused kernels hold the same
formulas in csrc/cpu/box_coders.h and kdops/triton/_box_coders.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prior_points(priors: torch.Tensor) -> torch.Tensor:
    """Points (A,2) as given, or the centres of (A,4) anchors (GFLHead.anchor_center)."""
    if priors.shape[-1] == 2:
        return priors
    return torch.stack([(priors[:, 2] + priors[:, 0]) / 2, (priors[:, 3] + priors[:, 1]) / 2], -1)


def integral(reg: torch.Tensor, reg_max: int) -> torch.Tensor:
    """GFL's Integral: softmax over reg_max+1 bins per side, expectation of the bin index."""
    project = torch.linspace(0, reg_max, reg_max + 1, dtype=reg.dtype, device=reg.device)
    p = F.softmax(reg.reshape(-1, reg_max + 1), dim=1)
    return F.linear(p, project).reshape(-1, 4)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """mmdet's DistancePointBBoxCoder.decode without max_shape."""
    return torch.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                        points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], -1)


def clamp(x: torch.Tensor, min=None, max=None) -> torch.Tensor:
    """``x.clamp(min, max)`` with its subgradient at the bounds pinned to 0, the convention of
    torch 2.14's clamp (torch 2.11's passes the gradient there), so that the oracle of the
    kernels' tie cases (zero-area boxes, ratios at the clip) does not depend on the torch version.
    Same values as clamp for every non-NaN input."""
    if min is not None:
        x = torch.where(x > min, x, torch.full_like(x, min))
    if max is not None:
        x = torch.where(x < max, x, torch.full_like(x, max))
    return x


def delta2bbox(rois, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), wh_ratio_clip=16 / 1000):
    """mmdet's DeltaXYWHBBoxCoder.decode (add_ctr_clamp=False, no max_shape)."""
    means = deltas.new_tensor(means).view(1, -1)
    stds = deltas.new_tensor(stds).view(1, -1)
    denorm = deltas * stds + means
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    max_ratio = abs(math.log(wh_ratio_clip))
    dwh = clamp(dwh, min=-max_ratio, max=max_ratio)
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    gxy = pxy + pwh * dxy
    gwh = pwh * dwh.exp()
    return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)


def bbox_overlaps_aligned(b1, b2, mode="giou", eps=1e-6):
    """mmdet's bbox_overlaps(..., is_aligned=True) for (A,4) xyxy boxes."""
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, :2], b2[:, :2])
    rb = torch.min(b1[:, 2:], b2[:, 2:])
    wh = clamp(rb - lt, min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = torch.max(area1 + area2 - overlap, union_eps := overlap.new_tensor([eps]))
    ious = overlap / union
    if mode == "iou":
        return ious
    enc_wh = clamp(torch.max(b1[:, 2:], b2[:, 2:]) - torch.min(b1[:, :2], b2[:, :2]), min=0)
    enclose = torch.max(enc_wh[:, 0] * enc_wh[:, 1], union_eps)
    return ious - (enclose - union) / enclose


def decode(decoder, reg, priors, stride, reg_max, means, stds, wh_ratio_clip):
    if decoder == "delta_xywh":
        return delta2bbox(priors, reg, means, stds, wh_ratio_clip)
    pts = prior_points(priors)
    if stride is not None:
        pts = pts / stride
    dist = integral(reg, reg_max) if decoder == "gfl" else reg
    return distance2bbox(pts, dist)
