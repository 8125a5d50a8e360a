"""Reference BCKD localisation loss, written from the paper's formula and the authors' code.

Pan et al. (ICCV 2023), github.com/TinyTigerPan/BCKD: the ``loss_score_kd`` branch of
``LDHead.loss_single``, GIoU between decoded student and teacher boxes at every anchor, weighted
by the largest classification score gap. It materialises weights and decoded boxes for every
anchor (kdops/reference/box_coders.py), as the authors' code does. Regression (A,D) or
(N,J*D,H,W), D = 4 (distance / delta_xywh) or 4*(reg_max+1) (gfl).
"""
from __future__ import annotations

import torch

from .._dtype import acc_dtype
from ._dense_head import as_levels, flatten_anchors, reduce_anchors
from .box_coders import bbox_overlaps_aligned, clamp, decode


def _loc_level(sr, tr, ls, lt, priors, weight, stride, decoder, loss, reg_max, means, stds, wh_ratio_clip,
               avg_factor, reduction):
    acc = acc_dtype(sr)
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
    return reduce_anchors(per * w, weight, reduction, avg_factor)


def bckd_loc_loss(student_reg, teacher_reg, student_logits, teacher_logits, priors, *, decoder="distance",
                  loss="giou", weight=None, avg_factor=None, reduction="sum", reg_max=16, strides=None,
                  means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), wh_ratio_clip=16 / 1000):
    """sum_a w_a * weight_a * (1 - GIoU(decode(student), decode(teacher))), per level."""
    srs, seq = as_levels(student_reg)
    n = len(srs)
    trs, lss, lts, prs = as_levels(teacher_reg)[0], as_levels(student_logits)[0], as_levels(teacher_logits)[0], as_levels(priors)[0]
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
