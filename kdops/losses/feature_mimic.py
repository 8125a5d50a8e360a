"""Weighted feature imitation: FitNet, FGFI, DeFeat and FGD's focal feature loss."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import masked_mse

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]
Masks = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


@torch.no_grad()
def fgd_attention(feat: torch.Tensor, temperature: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""FGD's spatial and channel attention of a (teacher) feature map (Yang et al., CVPR 2022).

    .. math::
        A^S = HW\,\mathrm{softmax}_{hw}\Big(\tfrac{1}{C}\textstyle\sum_c |F| / T\Big),\qquad
        A^C = C\,\mathrm{softmax}_{c}\Big(\tfrac{1}{HW}\textstyle\sum_{hw} |F| / T\Big)

    Returns (A^S of shape (N,H,W), A^C of shape (N,C)), float32 (float64 for float64).
    """
    N, C, H, W = feat.shape
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    a = feat.abs().to(acc)
    spatial = a.mean(dim=1).reshape(N, -1)
    channel = a.mean(dim=(2, 3))
    s_att = (H * W) * F.softmax(spatial / temperature, dim=1)
    c_att = C * F.softmax(channel / temperature, dim=1)
    return s_att.reshape(N, H, W), c_att


class FeatureMimicLoss(nn.Module):
    r"""Foreground/background-weighted feature MSE with optional FGD attention, one fused pass.

    Per level, with fg/bg masks :math:`M^{fg}, M^{bg}` (N,H,W):

    .. math::
        \mathcal{L} = \frac{w}{Z}\sum_{n,c,h,w}
            \big(\alpha M^{fg}_{nhw} + \beta M^{bg}_{nhw}\big)\, A^S_{nhw}\, A^C_{nc}\,
            (S_{nchw} - T_{nchw})^2

    where :math:`A^S, A^C` are the teacher's FGD attention maps (:func:`fgd_attention`;
    both 1 when ``attention=False``) and Z the normaliser:

    - FitNet (Romero et al. 2015): no masks, ``normalize="numel"`` (a plain MSE).
    - FGFI (Wang et al. 2019): ``fg_mask`` = imitation mask, ``bg_weight=0``,
      ``normalize="mask"`` (Z = sum of the mask), ``loss_weight=0.5`` for its 1/2.
    - DeFeat (Guo et al. 2021): binary fg mask, bg = 1 - fg, separate ``fg_weight`` /
      ``bg_weight``.
    - FGD's focal loss (Yang et al. 2022): ``attention=True``, ``fg_mask`` = 1/box-area
      weighted mask, ``bg_mask`` = normalised background, ``fg_weight=alpha_fgd``,
      ``bg_weight=beta_fgd``, ``normalize="batch"`` (Z = N). The attention and global
      (GcBlock) terms of FGD are separate losses and not part of this module.

    Args:
        fg_weight, bg_weight: alpha, beta.
        attention: multiply by the teacher's spatial/channel attention (FGD).
        temperature: FGD's T for the attention softmax.
        normalize: "none" | "batch" (Z=N) | "numel" (Z=NCHW) | "mask" (Z = sum of the combined
            pixel weight before attention, at least 1).
        loss_weight: w.

    Forward(student, teacher, fg_mask=None, bg_mask=None): tensors (N,C,H,W) or sequences of
    levels; masks (N,H,W) per level. With ``fg_mask`` and no ``bg_mask``, the background is
    ``fg_mask <= 0``. With no masks every pixel weighs ``fg_weight``. Returns the sum over
    levels, 0-d float32 (float64 for float64 inputs).
    """

    def __init__(self, fg_weight: float = 1.0, bg_weight: float = 1.0, attention: bool = False,
                 temperature: float = 0.5, normalize: str = "batch", loss_weight: float = 1.0) -> None:
        super().__init__()
        if normalize not in ("none", "batch", "numel", "mask"):
            raise ValueError(f"FeatureMimicLoss: `normalize` must be none|batch|numel|mask, got {normalize!r}")
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.attention, self.temperature = attention, temperature
        self.normalize, self.loss_weight = normalize, loss_weight

    def _pixel_weight(self, t: torch.Tensor, fg, bg):
        N, C, H, W = t.shape
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if fg is None and bg is None:
            pw = None if self.fg_weight == 1.0 else torch.full((N, H, W), self.fg_weight, dtype=acc, device=t.device)
        else:
            if fg is None:
                raise ValueError("FeatureMimicLoss: pass `fg_mask` together with `bg_mask`")
            fg = fg.to(acc)
            bg = (fg <= 0).to(acc) if bg is None else bg.to(acc)
            pw = self.fg_weight * fg + self.bg_weight * bg
        return pw

    def forward(self, student: Feats, teacher: Feats, fg_mask: Masks = None, bg_mask: Masks = None) -> torch.Tensor:
        single = isinstance(student, torch.Tensor)
        S = [student] if single else list(student)
        T = [teacher] if single else list(teacher)
        L = len(S)
        fgs = [fg_mask] if single else (list(fg_mask) if fg_mask is not None else [None] * L)
        bgs = [bg_mask] if single else (list(bg_mask) if bg_mask is not None else [None] * L)
        if not (len(T) == len(fgs) == len(bgs) == L):
            raise ValueError("FeatureMimicLoss: student, teacher and masks must have one entry per level")
        total = 0.0
        for s, t, fg, bg in zip(S, T, fgs, bgs):
            pw = self._pixel_weight(t, fg, bg)
            z = self._normaliser(s, pw)
            cw = None
            if self.attention:
                s_att, cw = fgd_attention(t.detach(), self.temperature)
                pw = s_att if pw is None else pw * s_att
            total = total + masked_mse(s, t, pixel_weight=pw, channel_weight=cw) / z
        return total * self.loss_weight

    def _normaliser(self, s, pw):
        if self.normalize == "batch":
            return max(s.shape[0], 1)
        if self.normalize == "numel":
            return max(s.numel(), 1)
        if self.normalize == "mask":
            return (pw.sum() if pw is not None else s.new_tensor(float(s[:, 0].numel()))).clamp(min=1.0)
        return 1.0
