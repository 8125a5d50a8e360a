"""Weighted feature imitation: FitNet, FGFI, DeFeat and FGD's focal feature loss."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dtype import FLOAT_DTYPES, acc_dtype
from ..ops import box_masks, masked_mse
from ..ops.box_ranges import check_boxes
from ..ops._validation import (
    check_box_args, check_choice, check_flag, check_number, check_pair, check_strides, check_tensor, match_levels,
    paired_levels, per_level_numbers,
)
from .fgd import fgd_attention_maps

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]
Masks = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]
OP = "FeatureMimicLoss"
NORMALIZE = ("none", "batch", "numel", "mask")
MASK_MODES = ("fgd", "binary", "defeat")
MASK_RULES = ("fgd", "center", "lgd")
MASK_DTYPES = FLOAT_DTYPES + (torch.bool,)
ATT = "kdops.losses.fgd_attention"


@torch.no_grad()
def fgd_attention(feat: torch.Tensor, temperature: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""FGD's spatial and channel attention of a (teacher) feature map (Yang et al., CVPR 2022).

    .. math::
        A^S = HW\,\mathrm{softmax}_{hw}\Big(\tfrac{1}{C}\textstyle\sum_c |F| / T\Big),\qquad
        A^C = C\,\mathrm{softmax}_{c}\Big(\tfrac{1}{HW}\textstyle\sum_{hw} |F| / T\Big)

    Returns (A^S of shape (N,H,W), A^C of shape (N,C)), float32 (float64 for float64). On an
    empty map (C, H or W = 0) the means over the empty dimension are taken as 0, so the other
    attention is uniform (1 everywhere), never NaN.
    """
    check_tensor(ATT, "feat", feat, ndim=4, what="(N,C,H,W)")
    check_number(ATT, "temperature", temperature, low=0.0, low_open=True)
    return fgd_attention_maps(feat, temperature)


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
    - DeFeat (Guo et al., CVPR 2021): GT-box foreground and its complement, each normalised
      per image (``mask_mode="defeat"``), ``fg_weight=1``, ``bg_weight`` = the background gain
      (4 in LutingWang/HEAD's DeFeat config), ``normalize="none"``, ``loss_weight=1/256``;
      or explicit binary masks with separate ``fg_weight`` / ``bg_weight``.
    - FGD's focal loss (Yang et al. 2022): ``attention=True``, ``fg_mask`` = 1/box-area
      weighted mask, ``bg_mask`` = normalised background, ``fg_weight=alpha_fgd``,
      ``bg_weight=beta_fgd``, ``normalize="batch"`` (Z = N). The attention and global
      (GcBlock) terms of FGD are separate losses and not part of this module.

    Args:
        fg_weight, bg_weight: alpha, beta (finite numbers >= 0).
        attention: multiply by the teacher's spatial/channel attention (FGD).
        temperature: FGD's T for the attention softmax (> 0).
        normalize: "none" | "batch" (Z=N) | "numel" (Z=NCHW) | "mask" (Z = sum of the combined
            pixel weight before attention, at least 1).
        loss_weight: w (>= 0).

        strides: one positive number per level (a single number for a single level); needed to
            build the masks from GT boxes in forward.
        mask_mode: how GT boxes become masks: "fgd" (1/area foreground, normalised
            background) or "binary" (see :func:`kdops.box_masks`), or "defeat": the binary
            foreground divided by its pixel count per image, and the binary background divided
            by its own (each count at least 1) -- DeFeat's masks as LutingWang/HEAD's
            ``DeFeatMask`` builds them (the DeFeat authors released no code). HEAD's box-to-pixel
            rule is [int(x1/s), int(x2/s)+1]; the default ``mask_rule="fgd"`` gives
            [floor(x1/s), ceil(x2/s)], the same range unless x2/s is a whole number.
        mask_rule: box-to-pixel rule of :func:`kdops.box_ranges` ("fgd", "center", "lgd").
        strict_boxes: raise (instead of warning once) when GT boxes can cover nothing; see
            :func:`kdops.check_boxes`.

    Forward(student, teacher, fg_mask=None, bg_mask=None, *, boxes=None, batch_index=None,
    image_size=None): tensors (N,C,H,W) or sequences of levels; masks (N,H,W) per level,
    or GT ``boxes`` (K,4) xyxy with ``batch_index`` (K,) from which :func:`kdops.box_masks`
    builds them on the device (no loop over boxes). With ``fg_mask`` and no ``bg_mask``, the
    background is ``fg_mask <= 0``. With no masks every pixel weighs ``fg_weight``. Masks are
    floating or bool, of the level's (N,H,W), on its device. Returns the sum over levels, 0-d
    float32 (float64 for float64 inputs). Every argument is checked before any work
    (``TypeError`` / ``ValueError`` naming it); an empty level (N, C, H or W = 0) contributes
    exactly 0, with zero gradients.

    Example (FGD's feature term on an FPN, image 800x1216)::

        loss_fn = FeatureMimicLoss(fg_weight=5e-5, bg_weight=2.5e-5, attention=True,
                                   strides=[8, 16, 32, 64, 128])
        loss = loss_fn(student_fpn, teacher_fpn, boxes=gt_boxes, batch_index=img_idx,
                       image_size=(800, 1216))
    """

    def __init__(self, fg_weight: float = 1.0, bg_weight: float = 1.0, attention: bool = False,
                 temperature: float = 0.5, normalize: str = "batch", loss_weight: float = 1.0,
                 strides: Optional[Union[float, Sequence[float]]] = None, mask_mode: str = "fgd",
                 mask_rule: str = "fgd", strict_boxes: bool = False) -> None:
        super().__init__()
        self.fg_weight = check_number(OP, "fg_weight", fg_weight, low=0.0)
        self.bg_weight = check_number(OP, "bg_weight", bg_weight, low=0.0)
        self.attention = check_flag(OP, "attention", attention)
        self.temperature = check_number(OP, "temperature", temperature, low=0.0, low_open=True)
        self.normalize = check_choice(OP, "normalize", normalize, NORMALIZE)
        self.loss_weight = check_number(OP, "loss_weight", loss_weight, low=0.0)
        self.strides = check_strides(OP, strides)
        self.mask_mode = check_choice(OP, "mask_mode", mask_mode, MASK_MODES)
        self.mask_rule = check_choice(OP, "mask_rule", mask_rule, MASK_RULES)
        self.strict_boxes = check_flag(OP, "strict_boxes", strict_boxes)

    def _pixel_weight(self, t: torch.Tensor, fg, bg):
        N, C, H, W = t.shape
        acc = acc_dtype(t)
        if fg is None and bg is None:
            pw = None if self.fg_weight == 1.0 else torch.full((N, H, W), self.fg_weight, dtype=acc, device=t.device)
        else:
            fg = fg.to(acc)
            bg = (fg <= 0).to(acc) if bg is None else bg.to(acc)
            pw = self.fg_weight * fg + self.bg_weight * bg
        return pw

    def forward(self, student: Feats, teacher: Feats, fg_mask: Masks = None, bg_mask: Masks = None, *,
                boxes: Optional[torch.Tensor] = None, batch_index: Optional[torch.Tensor] = None,
                image_size=None) -> torch.Tensor:
        r"""The weighted feature MSE of the class docstring, summed over levels.

        Args:
            student, teacher: (N,C,H,W) or sequences of L FPN levels, same shapes pairwise.
            fg_mask, bg_mask: (N,H,W) per level, floating or bool, on the features' device; with
                ``fg_mask`` alone the background is ``fg_mask <= 0``; with neither every pixel
                weighs ``fg_weight``.
            boxes: instead of masks, GT boxes (K,4) xyxy in input-image pixels (needs ``strides``
                in the constructor); the masks are built on the device by :func:`kdops.box_masks`
                with ``mask_mode`` / ``mask_rule`` (FGD: Yang et al., CVPR 2022, Sec. 3.1).
            batch_index: (K,) int64, the image of each box. Boxes that can cover nothing
                (batch index outside [0, N), x2 < x1 or y2 < y1, NaN/inf) are reported by
                :func:`kdops.check_boxes` -- a one-time warning, or a ``ValueError`` with
                ``strict_boxes=True`` -- on host-readable tensors (GPU: only with
                ``KDOPS_DEBUG_CHECKS=1``, which synchronises).
            image_size: None, (height, width) of the (unpadded) input image, or a (K,2) tensor
                per box; see :func:`kdops.box_ranges`.

        Returns:
            0-d float32 loss (float64 for float64 inputs).
        """
        (S, T), seq = paired_levels(OP, ("student", "teacher"), student, teacher)
        L = len(S)
        for i, (s, t) in enumerate(zip(S, T)):
            check_pair(OP, s, t, i if seq else None)
            if i and s.device != S[0].device:
                raise ValueError(f"{OP}: `student[{i}]` is on {s.device} but `student[0]` on {S[0].device}")
        if bg_mask is not None and fg_mask is None:
            raise ValueError(f"{OP}: `bg_mask` needs `fg_mask` (with `fg_mask` alone the background is fg_mask <= 0)")
        if boxes is not None:
            if fg_mask is not None:
                raise ValueError(f"{OP}: pass either `fg_mask`/`bg_mask` or `boxes`, not both")
            if self.strides is None:
                raise ValueError(f"{OP}: building masks from `boxes` needs `strides` in the constructor "
                                 f"({OP}(strides=...), one per level), got None")
            check_box_args(OP, boxes, batch_index, image_size, like=S[0])
            strides = per_level_numbers(OP, "strides", self.strides, L, seq)
        elif batch_index is not None or image_size is not None:
            name = "batch_index" if batch_index is not None else "image_size"
            raise ValueError(f"{OP}: `{name}` is only used with `boxes` (GT boxes to build the masks from), "
                             "got no `boxes`")
        fgs = match_levels(OP, "fg_mask", fg_mask, L, seq)
        bgs = match_levels(OP, "bg_mask", bg_mask, L, seq)
        for i, (s, fg, bg) in enumerate(zip(S, fgs, bgs)):
            sfx = f"[{i}]" if seq else ""
            N, _, H, W = s.shape
            for name, m in (("fg_mask", fg), ("bg_mask", bg)):
                if m is not None:
                    check_tensor(OP, name + sfx, m, ndim=3, dtypes=MASK_DTYPES, like=s, shape=(N, H, W),
                                 what=f"(N,H,W) like `student{sfx}`")
        # ---- validated: the work starts here
        if boxes is not None:
            # boxes that cover nothing (bad batch index, inverted, NaN): a warning (or an error), host-readable
            # data only (no GPU sync unless KDOPS_DEBUG_CHECKS=1)
            check_boxes(boxes, batch_index, S[0].shape[0], strict=self.strict_boxes)
            sizes = [(x.shape[0], x.shape[2], x.shape[3]) for x in S]
            mode = "binary" if self.mask_mode == "defeat" else self.mask_mode
            fgs, bgs = box_masks(boxes, batch_index, sizes, strides, rule=self.mask_rule, image_size=image_size,
                                 mode=mode, dtype=acc_dtype(S[0]))
            if self.mask_mode == "defeat":  # each mask over its own pixel count, per image
                fgs = [m / m.sum((1, 2), keepdim=True).clamp(min=1) for m in fgs]
                bgs = [m / m.sum((1, 2), keepdim=True).clamp(min=1) for m in bgs]
        total = S[0].new_zeros((), dtype=acc_dtype(S[0]))
        for s, t, fg, bg in zip(S, T, fgs, bgs):
            if s.numel() == 0:  # an empty level: exactly 0, zero gradients (whatever the masks hold)
                # (a value-free 0 that still depends on the maps: x.sum() * 0 would be NaN for an inf)
                total = total + s.reshape(-1)[:0].sum().to(total.dtype) + t.reshape(-1)[:0].sum().to(total.dtype)
                continue
            pw = self._pixel_weight(t, fg, bg)
            z = self._normaliser(s, pw)
            cw = None
            if self.attention:
                s_att, cw = fgd_attention(t.detach(), self.temperature)
                pw = s_att if pw is None else pw * s_att
            # the loss weight (and a host-side normaliser) folded into masked_mse: its CPU backward
            # then has no pass left to scale the student's gradient by
            w = float(self.loss_weight)
            if isinstance(z, torch.Tensor):  # the mask's sum, on the device: no host read
                total = total + masked_mse(s, t, pixel_weight=pw, channel_weight=cw, scale=w) / z
            else:
                total = total + masked_mse(s, t, pixel_weight=pw, channel_weight=cw, scale=w / z)
        return total

    def _normaliser(self, s, pw):
        if self.normalize == "batch":
            return max(s.shape[0], 1)
        if self.normalize == "numel":
            return max(s.numel(), 1)
        if self.normalize == "mask":
            N, _, H, W = s.shape
            return (pw.sum() if pw is not None else s.new_tensor(float(N * H * W), dtype=acc_dtype(s))).clamp(min=1.0)
        return 1.0
