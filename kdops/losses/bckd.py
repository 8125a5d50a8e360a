"""BCKD: Bridging Cross-task Protocol Inconsistency for Distillation (Pan et al., ICCV 2023)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..ops import bckd_cls_loss, bckd_loc_loss

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


class BCKDLoss(nn.Module):
    r"""BCKD's distillation losses for a dense head, as the authors' GFL ``LDHead`` computes them.

    .. math::
        \mathcal{L} = \alpha_1 \frac{1}{Z}\sum_a w_a \sum_k \mathrm{BCE}(s_{ak}, \sigma(t_{ak}))
                      |\sigma(t_{ak}) - \sigma(s_{ak})|^{\beta}
                    + \alpha_2 \frac{1}{Z}\sum_a \max_k|\sigma(t_{ak}) - \sigma(s_{ak})|\, w_a
                      \big(1 - \mathrm{GIoU}(\hat b^s_a, \hat b^t_a)\big)

    with :math:`Z` = ``avg_factor`` + float32 eps (the number of positives in the authors'
    code, ``num_total_samples``), :math:`w_a` the label weights, and the paper's defaults
    :math:`\alpha_1 = 1` (``NovelKDLoss``, loss_weight 1.0), :math:`\alpha_2 = 4`
    (``loss_score_kd = GIoULoss(loss_weight=4.0)``). Both terms are fused kdops ops
    (:func:`kdops.bckd_cls_loss`, :func:`kdops.bckd_loc_loss`): no sigmoid maps, weights or
    decoded boxes are materialised. Unlike the authors' code, the terms are not skipped
    (set to 0) when a batch has no positive anchor: that would need a host sync.

    Args:
        alpha_cls, alpha_loc: the weights of the two terms (1.0 and 4.0 in the paper).
        beta: exponent of the classification gap (1.0).
        decoder: "gfl" (the paper's GFL heads), "distance" or "delta_xywh"; loss: "giou"/"iou".
        reg_max, strides, means, stds, wh_ratio_clip: decoder settings, see kdops.bckd_loc_loss.

    Forward returns ``{"loss_bckd_cls": ..., "loss_bckd_loc": ...}`` (0-d tensors; per-level
    terms are summed, as mmdet sums a head's per-level losses).
    """

    def __init__(self, alpha_cls: float = 1.0, alpha_loc: float = 4.0, beta: float = 1.0, decoder: str = "gfl",
                 loss: str = "giou", reg_max: int = 16, strides: Optional[Sequence[float]] = (8, 16, 32, 64, 128),
                 means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000) -> None:
        super().__init__()
        self.alpha_cls, self.alpha_loc, self.beta = alpha_cls, alpha_loc, beta
        self.decoder, self.loss = decoder, loss
        self.reg_max, self.strides = reg_max, strides
        self.means, self.stds, self.wh_ratio_clip = tuple(means), tuple(stds), wh_ratio_clip

    def forward(self, student_logits: Levels, teacher_logits: Levels, student_reg: Levels, teacher_reg: Levels,
                priors: Levels, *, weight=None, avg_factor=None) -> Dict[str, torch.Tensor]:
        seq = isinstance(student_logits, (list, tuple))
        strides = None
        if self.decoder != "delta_xywh":
            strides = self.strides
            if strides is not None and not seq:
                strides = strides[0] if isinstance(strides, (list, tuple)) else strides
            elif strides is not None and len(strides) != len(student_logits):
                strides = tuple(strides)[: len(student_logits)]
        cls = bckd_cls_loss(student_logits, teacher_logits, weight=weight, beta=self.beta, avg_factor=avg_factor)
        loc = bckd_loc_loss(student_reg, teacher_reg, student_logits, teacher_logits, priors, decoder=self.decoder,
                            loss=self.loss, weight=weight, avg_factor=avg_factor, reg_max=self.reg_max,
                            strides=strides, means=self.means, stds=self.stds, wh_ratio_clip=self.wh_ratio_clip)
        return {"loss_bckd_cls": cls.sum() * self.alpha_cls, "loss_bckd_loc": loc.sum() * self.alpha_loc}
