"""Eager dense-head helpers shared by the references of the ops that read detector heads:
mmdet's layouts and mmdet's loss normalisation (``weight_reduce_loss``)."""
from __future__ import annotations

import torch

FLT_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)


def flatten_anchors(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """(A,C) stays; (N,J*C,H,W) -> (N*H*W*J, C) in mmdet's permute/reshape order."""
    if x.dim() == 2:
        return x
    N, JC, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(N * H * W * (JC // per_anchor), per_anchor)


def reduce_anchors(per_anchor, weight, reduction, avg_factor):
    if weight is not None:
        per_anchor = per_anchor * weight.reshape(-1).to(per_anchor.dtype)
    if avg_factor is not None:
        return per_anchor.sum() / (avg_factor + FLT_EPS)
    if reduction == "mean":
        return per_anchor.sum() / max(per_anchor.numel(), 1)
    return per_anchor.sum()


def as_levels(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)
