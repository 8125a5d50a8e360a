"""Reference BCKD losses, written from the paper's formulas and the authors' code.

Pan et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense
Object Detection" (ICCV 2023), github.com/TinyTigerPan/BCKD: ``novel_kd_loss``
(classification) and the ``loss_score_kd`` branch of ``LDHead.loss_single``
(localisation: GIoU between decoded student and teacher boxes at every anchor,
weighted by the largest classification score gap). They materialise sigmoid maps,
weights and decoded boxes for every anchor, as the authors' code does.

Layouts: logits (A,K) or mmdet's (N,J*K,H,W); regression (A,D) or (N,J*D,H,W), D = 4
(distance / delta_xywh) or 4*(reg_max+1) (gfl); anchors are ordered (n,h,w,j), as
``permute(0,2,3,1).reshape(-1, ...)`` orders them in mmdet.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FLT_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def flatten_anchors(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """(A,C) stays; (N,J*C,H,W) -> (N*H*W*J, C) in mmdet's permute/reshape order."""
    if x.dim() == 2:
        return x
    N, JC, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(N * H * W * (JC // per_anchor), per_anchor)


def _reduce(per_anchor, weight, reduction, avg_factor):
    if weight is not None:
        per_anchor = per_anchor * weight.reshape(-1).to(per_anchor.dtype)
    if avg_factor is not None:
        return per_anchor.sum() / (avg_factor + FLT_EPS)
    if reduction == "mean":
        return per_anchor.sum() / max(per_anchor.numel(), 1)
    return per_anchor.sum()


def _levels(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def _cls_level(ls, lt, weight, beta, reduction, avg_factor):
    K = ls.shape[1] if ls.dim() == 2 else None
    if K is None:  # (N,J*K,H,W): J from the weight (one entry per anchor), else J = 1
        N, JK, H, W = ls.shape
        J = weight.numel() // max(N * H * W, 1) if weight is not None else 1
        K = JK // max(J, 1)
    acc = _acc(ls)
    pred = flatten_anchors(ls, K).to(acc)
    target = flatten_anchors(lt, K).to(acc).sigmoid().detach()
    score = pred.sigmoid()
    scale_factor = target - score  # not detached: its gradient flows (novel_kd_loss)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * scale_factor.abs().pow(beta)
    return _reduce(loss.sum(dim=-1), weight, reduction, avg_factor)


def bckd_cls_loss(student_logits, teacher_logits, *, weight=None, beta=1.0, reduction="sum", avg_factor=None):
    """sum_a w_a sum_k BCEWithLogits(l_s, sigmoid(l_t)) * |sigmoid(l_t) - sigmoid(l_s)|^beta, per level."""
    ss, seq = _levels(student_logits)
    ts, _ = _levels(teacher_logits)
    ws = weight if (seq and weight is not None) else [weight] * len(ss)
    out = [_cls_level(s, t, w, beta, reduction, avg_factor) for s, t, w in zip(ss, ts, ws)]
    return torch.stack(out) if seq else out[0]


# ----------------------------------------------------------------------------- decoders
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


def _loc_level(sr, tr, ls, lt, priors, weight, stride, decoder, loss, reg_max, means, stds, wh_ratio_clip,
               avg_factor, reduction):
    acc = _acc(sr)
    D = 4 * (reg_max + 1) if decoder == "gfl" else 4
    sreg = flatten_anchors(sr, D).to(acc)
    treg = flatten_anchors(tr, D).to(acc)
    A = sreg.shape[0]
    K = ls.shape[1] if ls.dim() == 2 else ls.shape[1] // max(sr.shape[1] // D, 1)
    s_score = flatten_anchors(ls, K).detach().to(acc).sigmoid()
    t_score = flatten_anchors(lt, K).detach().to(acc).sigmoid()
    w = (t_score - s_score).abs().max(dim=1)[0] if K > 0 else s_score.new_zeros(A)
    pri = priors.to(acc)
    if pri.shape[0] != A and A > 0:
        pri = pri.repeat(A // pri.shape[0], 1)
    if isinstance(stride, torch.Tensor):
        stride = stride.reshape(-1, 1).to(acc)
    bs = decode(decoder, sreg, pri, stride, reg_max, means, stds, wh_ratio_clip)
    bt = decode(decoder, treg, pri, stride, reg_max, means, stds, wh_ratio_clip).detach()
    if loss == "giou":
        per = 1 - bbox_overlaps_aligned(bs, bt, "giou", 1e-6)
    else:  # mmdet IoULoss(mode="linear"): 1 - clamp(iou, min=eps)
        per = 1 - clamp(bbox_overlaps_aligned(bs, bt, "iou", 1e-6), min=1e-6)
    return _reduce(per * w, weight, reduction, avg_factor)


def bckd_loc_loss(student_reg, teacher_reg, student_logits, teacher_logits, priors, *, decoder="distance",
                  loss="giou", weight=None, avg_factor=None, reduction="sum", reg_max=16, strides=None,
                  means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), wh_ratio_clip=16 / 1000):
    """sum_a w_a * weight_a * (1 - GIoU(decode(student), decode(teacher))), per level."""
    srs, seq = _levels(student_reg)
    n = len(srs)
    trs, lss, lts, prs = _levels(teacher_reg)[0], _levels(student_logits)[0], _levels(teacher_logits)[0], _levels(priors)[0]
    ws = weight if (seq and weight is not None) else [weight] * n
    if strides is None:
        sts = [None] * n
    elif seq:
        sts = list(strides)
    else:
        sts = [strides]
    out = [_loc_level(*a, decoder, loss, reg_max, means, stds, wh_ratio_clip, avg_factor, reduction)
           for a in zip(srs, trs, lss, lts, prs, ws, sts)]
    return torch.stack(out) if seq else out[0]
