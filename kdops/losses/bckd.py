"""BCKD: Bridging Cross-task Protocol Inconsistency for Distillation (Pan et al., ICCV 2023)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..ops import bckd_cls_loss, bckd_loc_loss
from ..ops._validation import (
    check_avg_factor, check_choice, check_number, check_numbers, check_strides, check_tensor, match_levels,
    paired_levels,
)

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]
OP = "BCKDLoss"
DECODERS = ("gfl", "distance", "delta_xywh")
LOSSES = ("giou", "iou")
_LEVEL_ARGS = ("student_logits", "teacher_logits", "student_reg", "teacher_reg", "priors")


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
        alpha_cls, alpha_loc: the weights of the two terms (1.0 and 4.0 in the paper; finite, >= 0).
        beta: exponent of the classification gap (1.0; finite, > 0).
        decoder: "gfl" (the paper's GFL heads), "distance" or "delta_xywh"; loss: "giou"/"iou".
        reg_max: GFL's last bin index (int >= 0).
        strides: positive numbers, one per level (levels use the first L of them, so the
            default five FPN strides serve heads with fewer levels); a number for a single level;
            or, for a single flattened (A,K) input, an (A,) tensor. Required by "gfl", ignored
            by "delta_xywh".
        means, stds: 4 finite numbers each (stds > 0); wh_ratio_clip: in (0, 1]. Decoder
            settings, see :func:`kdops.bckd_loc_loss`.

    Forward(student_logits, teacher_logits, student_reg, teacher_reg, priors, *, weight=None,
    avg_factor=None) takes tensors or sequences of L levels (all five alike) and returns
    ``{"loss_bckd_cls": ..., "loss_bckd_loc": ...}`` (0-d tensors; per-level terms are summed,
    as mmdet sums a head's per-level losses). Every argument is checked before any work;
    empty levels or batches give exact zeros.
    """

    def __init__(self, alpha_cls: float = 1.0, alpha_loc: float = 4.0, beta: float = 1.0, decoder: str = "gfl",
                 loss: str = "giou", reg_max: int = 16, strides: Optional[Sequence[float]] = (8, 16, 32, 64, 128),
                 means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000) -> None:
        super().__init__()
        self.alpha_cls = check_number(OP, "alpha_cls", alpha_cls, low=0.0)
        self.alpha_loc = check_number(OP, "alpha_loc", alpha_loc, low=0.0)
        self.beta = check_number(OP, "beta", beta, low=0.0, low_open=True)
        self.decoder = check_choice(OP, "decoder", decoder, DECODERS)
        self.loss = check_choice(OP, "loss", loss, LOSSES)
        self.reg_max = check_number(OP, "reg_max", reg_max, low=0, integer=True)
        if isinstance(strides, torch.Tensor):
            check_tensor(OP, "strides", strides, ndim=1, what="(A,) one stride per anchor",
                         dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64))
        else:
            strides = check_strides(OP, strides)
        if decoder == "gfl" and strides is None:
            raise ValueError(f"{OP}: decoder='gfl' needs `strides` (one per level), got None")
        self.strides = strides
        self.means = check_numbers(OP, "means", means, length=4)
        self.stds = check_numbers(OP, "stds", stds, length=4, low=0.0, low_open=True)
        self.wh_ratio_clip = check_number(OP, "wh_ratio_clip", wh_ratio_clip, low=0.0, low_open=True, high=1.0)

    def _level_strides(self, n_levels: int, seq: bool):
        """The strides the ops get: None, a number / tensor (single input), or L numbers."""
        st = self.strides
        if self.decoder == "delta_xywh" or st is None:
            return None
        if isinstance(st, torch.Tensor):
            if seq:
                raise ValueError(f"{OP}: a tensor `strides` is for a single flattened (A,K) input; give one number "
                                 f"per level for the {n_levels} levels")
            return st
        if not seq:
            return st[0] if isinstance(st, tuple) else st
        if not isinstance(st, tuple) or len(st) < n_levels:
            raise ValueError(f"{OP}: `strides` must give one stride per level ({n_levels}), got {st!r}")
        return st[:n_levels]

    def forward(self, student_logits: Levels, teacher_logits: Levels, student_reg: Levels, teacher_reg: Levels,
                priors: Levels, *, weight=None, avg_factor=None) -> Dict[str, torch.Tensor]:
        r"""BCKD's two distillation terms for one dense head (Pan et al., ICCV 2023, Eqs. 4-6).

        Shapes (A anchors of a level, K classes, J anchors per location, D = 4, or
        4·(reg_max+1) for ``decoder="gfl"``): every argument is one tensor or a sequence of L
        per-level tensors, all five alike.

        Args:
            student_logits, teacher_logits: (A,K) flattened, or the head's raw (N,J·K,H,W)
                output (mmdet's layout; read in place, no permuted copy). Pre-sigmoid.
            student_reg, teacher_reg: (A,D) or (N,J·D,H,W): distances (``"gfl"``: the
                reg_max+1 bin logits per side; ``"distance"``: l,t,r,b) or DeltaXYWH deltas.
            priors: (M,4) anchors (x1,y1,x2,y2) or (M,2) points (x,y) in image pixels, with A a
                multiple of M (H·W·J rows shared by the N images, or one row per anchor).
                Pass what the head's prior generator gives: mmdet's ``AnchorGenerator`` (GFL,
                RetinaNet) puts the anchor centre of cell (y, x) at (x·s, y·s), the cell's
                top-left corner (``center_offset=0``); ``MlvlPointGenerator`` puts points at
                the cell centre ((x+0.5)·s). Student and teacher boxes are decoded from the
                same prior, so a common shift moves both and leaves their (G)IoU -- and the
                loss -- unchanged: either convention gives the same value.
            weight: label weights, A values per level (e.g. (N,H·W·J) or (A,)), or None (1).
            avg_factor: Z, the number of positives as mmdet counts it (a number or a 1-element
                tensor, never read on the host), or None (1).

        Returns:
            ``{"loss_bckd_cls": alpha_cls·L_cls, "loss_bckd_loc": alpha_loc·L_loc}``: 0-d
            float32 tensors (float64 for float64 input), summed over levels. Gradients reach
            the student's logits and regression; teacher terms are detached.
        """
        args = (student_logits, teacher_logits, student_reg, teacher_reg, priors)
        levels, seq = paired_levels(OP, _LEVEL_ARGS, *args)
        L = len(levels[0])
        first = levels[0][0]
        for i in range(L):
            sfx = f"[{i}]" if seq else ""
            sl, tl, sr, tr, pr = (lv[i] for lv in levels)
            check_tensor(OP, f"student_logits{sfx}", sl, like=first, what="(A,K) or (N,J*K,H,W)")
            check_tensor(OP, f"student_reg{sfx}", sr, like=first, what="(A,D) or (N,J*D,H,W)")
            check_tensor(OP, f"priors{sfx}", pr, ndim=2, like=first, what="(M,4) anchors or (M,2) points")
            for name, x in (("student_logits", sl), ("student_reg", sr)):
                if x.dim() not in (2, 4):
                    raise ValueError(f"{OP}: `{name}{sfx}` must be 2-D (A,·) or 4-D (N,J*·,H,W), got shape "
                                     f"{tuple(x.shape)}")
            for name, t, s in (("teacher_logits", tl, sl), ("teacher_reg", tr, sr)):
                check_tensor(OP, f"{name}{sfx}", t, like=first, shape=tuple(s.shape),
                             what=f"(the shape of `student_{name[8:]}{sfx}`)")
                if t.dtype != s.dtype:
                    raise TypeError(f"{OP}: `{name}{sfx}` is {t.dtype} but `student_{name[8:]}{sfx}` is {s.dtype}")
        ws = match_levels(OP, "weight", weight, L, seq)
        for i, w in enumerate(ws):
            if w is not None:
                check_tensor(OP, f"weight[{i}]" if seq else "weight", w, like=first, what="(one value per anchor)")
        if isinstance(avg_factor, (int, float)):
            check_number(OP, "avg_factor", avg_factor, low=0.0)
        check_avg_factor(OP, avg_factor, first)
        strides = self._level_strides(L, seq)
        # The localisation op checks every tensor the classification op reads (logits, weight,
        # avg_factor), so running it first leaves no check after any work.
        loc = bckd_loc_loss(student_reg, teacher_reg, student_logits, teacher_logits, priors, decoder=self.decoder,
                            loss=self.loss, weight=weight, avg_factor=avg_factor, reg_max=self.reg_max,
                            strides=strides, means=self.means, stds=self.stds, wh_ratio_clip=self.wh_ratio_clip)
        cls = bckd_cls_loss(student_logits, teacher_logits, weight=weight, beta=self.beta, avg_factor=avg_factor)
        return {"loss_bckd_cls": cls.sum() * self.alpha_cls, "loss_bckd_loc": loc.sum() * self.alpha_loc}
