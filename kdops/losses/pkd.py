"""PKD: Pearson-correlation feature distillation (Cao et al., NeurIPS 2022)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dtype import acc_dtype
from ..ops import pcc_mse
from ..ops._validation import check_flag, check_number, check_tensor, paired_levels

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]
OP = "PKDLoss"


class PKDLoss(nn.Module):
    r"""PKD loss, numerically the same as mmrazor's ``PKDLoss`` for the same inputs.

    .. math::
        \mathcal{L} = w \sum_{l} \tfrac{1}{2}\,\mathrm{MSE}\big(\hat S_l, \hat T_l\big),\qquad
        \hat X = \frac{X - \mu_c}{\sigma_c + 10^{-6}}

    with per-channel statistics over (N,H,W) (unbiased std) -- equivalently
    :math:`1 - r` of the Pearson correlation r between the feature vectors, averaged
    over channels. Fused through :func:`kdops.pcc_mse` (no normalised copies).

    Args:
        loss_weight: w (a finite number >= 0).
        resize_stu: when a level's heights differ (mmrazor compares only the heights), resize
            the student to the teacher's size with bilinear interpolation; otherwise the
            teacher to the student's. A level whose heights agree but widths differ (an error
            in mmrazor) is resized the same way.

    Forward takes (N,C,H,W) tensors or sequences of FPN levels (``preds_S`` the student's,
    ``preds_T`` the teacher's; one N, C, dtype and device per level pair) and returns a 0-d
    float32 loss (float64 for float64 inputs). A level with no element (N, C, H or W = 0 on
    either side) contributes exactly 0 with zero gradients.
    """

    def __init__(self, loss_weight: float = 1.0, resize_stu: bool = True) -> None:
        super().__init__()
        self.loss_weight = check_number(OP, "loss_weight", loss_weight, low=0.0)
        self.resize_stu = check_flag(OP, "resize_stu", resize_stu)

    def forward(self, preds_S: Feats, preds_T: Feats) -> torch.Tensor:
        r"""PKD's loss (Cao et al., "PKD: General Distillation Framework for Object Detectors via
        Pearson Correlation Coefficient", NeurIPS 2022): :math:`w\sum_l \tfrac12
        \mathrm{MSE}(\hat S_l, \hat T_l)` with per-channel normalisation over (N,H,W).

        Args:
            preds_S: the student's (N,C,H,W) map or a sequence of L FPN levels.
            preds_T: the teacher's, with the same N and C per level (project the channels
                first); a level whose H,W differ is resized (see ``resize_stu``).

        Returns:
            0-d float32 loss (float64 for float64 inputs); empty levels add exactly 0.
        """
        if isinstance(preds_S, (list, tuple)) and isinstance(preds_T, (list, tuple)) and len(preds_S) != len(preds_T):
            raise ValueError(f"{OP}: `preds_T` must have one level per level of `preds_S`, got {len(preds_S)} "
                             f"student and {len(preds_T)} teacher levels")
        (S, T), seq = paired_levels(OP, ("preds_S", "preds_T"), preds_S, preds_T)
        for i, (s, t) in enumerate(zip(S, T)):
            sfx = f"[{i}]" if seq else ""
            check_tensor(OP, f"preds_S{sfx}", s, ndim=4, like=S[0], what="(N,C,H,W)")
            check_tensor(OP, f"preds_T{sfx}", t, ndim=4, like=s, what="(N,C,H,W)")
            if s.dtype != t.dtype:
                raise TypeError(f"{OP}: `preds_S{sfx}` is {s.dtype} but `preds_T{sfx}` is {t.dtype}; "
                                "cast one to the other")
            if s.shape[:2] != t.shape[:2]:
                raise ValueError(f"{OP}: `preds_T{sfx}` must have the (N,C) of `preds_S{sfx}` {tuple(s.shape[:2])}, "
                                 f"got {tuple(t.shape[:2])} (project the channels first)")
        pairs, empty = [], []
        for s, t in zip(S, T):
            if s.numel() == 0 or t.numel() == 0:  # nothing to compare (and nothing to resize from)
                empty.append((s, t))
                continue
            if s.shape[2:] != t.shape[2:]:
                if self.resize_stu:
                    s = F.interpolate(s, t.shape[2:], mode="bilinear")
                else:
                    t = F.interpolate(t, s.shape[2:], mode="bilinear")
            pairs.append((s, t))
        w = 0.5 * self.loss_weight
        if pairs:
            # the weight is folded into the op: with loss.backward() over a sum of losses, the
            # CPU backward then has no pass left to scale the student's gradient by
            loss = pcc_mse([s for s, _ in pairs], [t for _, t in pairs], norm="channel", scale=w).sum()
        else:
            loss = S[0].new_zeros((), dtype=acc_dtype(S[0]))
        for s, t in empty:  # exact zeros, and zero (not missing) gradients, whatever the values
            loss = loss + _zero_touching(s, loss.dtype) + _zero_touching(t, loss.dtype)
        return loss


def _zero_touching(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact 0 that depends on ``x`` (so ``x`` gets a zero gradient, not None) without reading
    any of its values (``x.sum() * 0`` would be NaN for an infinite entry)."""
    return x.reshape(-1)[:0].sum().to(dtype)
