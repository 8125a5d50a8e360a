"""Reference normalised-feature MSE.

norm="channel" is mmrazor's PKDLoss normalisation (Cao et al., "PKD: General
Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
NeurIPS 2022): per channel over (N,H,W), (x - mean) / (unbiased std + 1e-6).
norm="instance" is ``F.instance_norm`` (biased variance, eps 1e-5) as LGD uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtype import acc_dtype


def channel_norm(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    N, C, H, W = feat.shape
    x = feat.permute(1, 0, 2, 3).reshape(C, -1)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True)
    x = (x - mean) / (std + eps)
    return x.reshape(C, N, H, W).permute(1, 0, 2, 3)


def _level(s, t, norm, eps):
    acc = acc_dtype(s)
    if s.numel() == 0:
        return s.new_zeros((), dtype=acc)
    s, t = s.to(acc), t.to(acc)
    if norm == "channel":
        e = 1e-6 if eps is None else eps
        ns, nt = channel_norm(s, e), channel_norm(t, e)
    else:
        e = 1e-5 if eps is None else eps
        ns, nt = F.instance_norm(s, eps=e), F.instance_norm(t, eps=e)
    return F.mse_loss(ns, nt)


def pcc_mse(student, teacher, *, norm="channel", eps=None):
    """mean((norm(s) - norm(t))^2); a (L,) tensor for sequences of levels."""
    if isinstance(student, torch.Tensor):
        return _level(student, teacher, norm, eps)
    return torch.stack([_level(s, t, norm, eps) for s, t in zip(student, teacher)])
