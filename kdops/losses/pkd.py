"""PKD: Pearson-correlation feature distillation (Cao et al., NeurIPS 2022)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import pcc_mse

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


class PKDLoss(nn.Module):
    r"""PKD loss, numerically the same as mmrazor's ``PKDLoss`` for the same inputs.

    .. math::
        \mathcal{L} = w \sum_{l} \tfrac{1}{2}\,\mathrm{MSE}\big(\hat S_l, \hat T_l\big),\qquad
        \hat X = \frac{X - \mu_c}{\sigma_c + 10^{-6}}

    with per-channel statistics over (N,H,W) (unbiased std) -- equivalently
    :math:`1 - r` of the Pearson correlation r between the feature vectors, averaged
    over channels. Fused through :func:`kdops.pcc_mse` (no normalised copies).

    Args:
        loss_weight: w.
        resize_stu: when a level's heights differ (mmrazor compares only the heights), resize
            the student to the teacher's size with bilinear interpolation; otherwise the
            teacher to the student's.

    Forward takes (N,C,H,W) tensors or sequences of FPN levels and returns a 0-d float32
    loss (float64 for float64 inputs).
    """

    def __init__(self, loss_weight: float = 1.0, resize_stu: bool = True) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.resize_stu = resize_stu

    def forward(self, preds_S: Feats, preds_T: Feats) -> torch.Tensor:
        if isinstance(preds_S, torch.Tensor):
            preds_S, preds_T = (preds_S,), (preds_T,)
        if len(preds_S) != len(preds_T):
            raise ValueError(f"PKDLoss: got {len(preds_S)} student and {len(preds_T)} teacher levels")
        S, T = [], []
        for s, t in zip(preds_S, preds_T):
            if s.dim() == 4 and t.dim() == 4 and s.shape[2] != t.shape[2]:
                if self.resize_stu:
                    s = F.interpolate(s, t.shape[2:], mode="bilinear")
                else:
                    t = F.interpolate(t, s.shape[2:], mode="bilinear")
            S.append(s)
            T.append(t)
        return pcc_mse(S, T, norm="channel").sum() * (0.5 * self.loss_weight)
