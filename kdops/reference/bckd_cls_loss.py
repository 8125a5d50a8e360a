"""Reference BCKD classification loss, written from the paper's formula and the authors' code.

Pan et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection" (ICCV 2023), github.com/TinyTigerPan/BCKD: ``novel_kd_loss``. It materialises the
sigmoid maps of every anchor, as the authors' code does. Logits (A,K) or mmdet's (N,J*K,H,W),
anchors ordered (n,h,w,j) (kdops/reference/_dense_head.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtype import acc_dtype
from ._dense_head import as_levels, flatten_anchors, reduce_anchors


def _cls_level(ls, lt, weight, beta, reduction, avg_factor):
    K = ls.shape[1] if ls.dim() == 2 else None
    if K is None:  # (N,J*K,H,W): J from the weight (one entry per anchor), else J = 1
        N, JK, H, W = ls.shape
        J = weight.numel() // max(N * H * W, 1) if weight is not None else 1
        K = JK // max(J, 1)
    acc = acc_dtype(ls)
    pred = flatten_anchors(ls, K).to(acc)
    target = flatten_anchors(lt, K).to(acc).sigmoid().detach()
    score = pred.sigmoid()
    scale_factor = target - score  # not detached: its gradient flows (novel_kd_loss)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * scale_factor.abs().pow(beta)
    return reduce_anchors(loss.sum(dim=-1), weight, reduction, avg_factor)


def bckd_cls_loss(student_logits, teacher_logits, *, weight=None, beta=1.0, reduction="sum", avg_factor=None):
    """sum_a w_a sum_k BCEWithLogits(l_s, sigmoid(l_t)) * |sigmoid(l_t) - sigmoid(l_s)|^beta, per level."""
    ss, seq = as_levels(student_logits)
    ts, _ = as_levels(teacher_logits)
    ws = weight if (seq and weight is not None) else [weight] * len(ss)
    out = [_cls_level(s, t, w, beta, reduction, avg_factor) for s, t, w in zip(ss, ts, ws)]
    return torch.stack(out) if seq else out[0]
