"""Dense-head helpers: mmdet's head layouts read in place, their validation, and mmdet's loss
normalisation.

Used by the BCKD ops today and by every op that reads a detector's dense-head outputs.
"""
from __future__ import annotations

import torch

from .._layout import anchor_view  # noqa: F401  (re-exported: the ops' layout helper)
from ._validation import check_choice, check_number, check_tensor

FLT_EPS = float(torch.finfo(torch.float32).eps)


def divide_by_avg_factor(loss: torch.Tensor, avg_factor) -> torch.Tensor:
    """mmdet's weight_reduce_loss(reduction="mean", avg_factor): sum / (avg_factor + float32 eps)."""
    if avg_factor is None:
        return loss
    return loss / (avg_factor + FLT_EPS)


def kernel_scale(reduction: str, n: int, avg_factor):
    """(scale applied inside the kernel, avg_factor left to divide by afterwards).

    A Python-number avg_factor is folded into the kernel (loss * 1/(avg_factor + eps)); a tensor
    one stays on the device and is divided afterwards (no host sync)."""
    if avg_factor is None:
        return (1.0 / max(n, 1) if reduction == "mean" else 1.0), None
    if isinstance(avg_factor, torch.Tensor):
        return 1.0, avg_factor
    return 1.0 / (avg_factor + FLT_EPS), None


def check_logits(op, s, t, sfx):
    check_tensor(op, f"student_logits{sfx}", s, what="(A,K) or (N,J*K,H,W)")
    check_tensor(op, f"teacher_logits{sfx}", t, like=s, what="(A,K) or (N,J*K,H,W)")
    if s.dim() not in (2, 4):
        raise ValueError(f"kdops.{op}: `student_logits{sfx}` must be (A,K) or (N,J*K,H,W), got shape {tuple(s.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"kdops.{op}: `teacher_logits{sfx}` must have the shape of `student_logits{sfx}` "
                         f"{tuple(s.shape)}, got {tuple(t.shape)}")
    if s.dtype != t.dtype:
        raise TypeError(f"kdops.{op}: `student_logits{sfx}` is {s.dtype} but `teacher_logits{sfx}` is {t.dtype}")


def n_anchor_sites(x):
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2] * x.shape[3]


def check_anchor_weight(op, w, A, like, sfx):
    if w is None:
        return None
    check_tensor(op, f"weight{sfx}", w, like=like)
    if w.numel() != A:
        raise ValueError(f"kdops.{op}: `weight{sfx}` must hold one value per anchor ({A}), got shape {tuple(w.shape)}")
    return w.reshape(-1)


def check_reduction(op, reduction, beta=None):
    check_choice(op, "reduction", reduction, ("sum", "mean"))
    if beta is not None:
        check_number(op, "beta", beta, low=0.0, low_open=True)
