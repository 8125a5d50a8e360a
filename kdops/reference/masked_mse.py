"""Reference weighted feature MSE (FitNet, FGFI, DeFeat, FGD feature loss)."""
from __future__ import annotations

import torch

from .._dtype import acc_dtype


def _level(s, t, pw, cw, reduction):
    acc = acc_dtype(s)
    d2 = (s.to(acc) - t.to(acc)) ** 2
    if pw is not None:
        d2 = d2 * pw.to(acc)[:, None, :, :]
    if cw is not None:
        d2 = d2 * cw.to(acc)[:, :, None, None]
    loss = d2.sum()
    if reduction == "mean":
        loss = loss / max(s.numel(), 1)
    return loss


def masked_mse(student, teacher, *, pixel_weight=None, channel_weight=None, reduction="sum"):
    """sum_{n,c,h,w} pixel_weight[n,h,w] * channel_weight[n,c] * (s - t)^2, per level."""
    if isinstance(student, torch.Tensor):
        return _level(student, teacher, pixel_weight, channel_weight, reduction)
    L = len(student)
    pws = pixel_weight if pixel_weight is not None else [None] * L
    cws = channel_weight if channel_weight is not None else [None] * L
    return torch.stack([_level(*a, reduction) for a in zip(student, teacher, pws, cws)])
