r"""FGD's global-relation modules (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022, Sec. 3.2): the GcBlock of GCNet (Cao et al., 2019) that FGD's global
loss compares, and the student/teacher pair the authors train with the student.

The authors' ``mmdet/distillation/losses/fgd.py`` (``FeatureLoss``) builds, per distilled FPN
level, ``conv_mask_s`` / ``channel_add_conv_s`` for the student and ``conv_mask_t`` /
``channel_add_conv_t`` for the teacher: two separate GcBlocks, both trained (by the global
loss only), dropped after distillation. :class:`FGDGlobal` is that pair;
``FGDGlobal(..., shared=True)`` is the paper's notation, one :math:`\mathcal{R}` for both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GcBlock", "FGDGlobal"]


def _check_channels(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r}")
    return value


class GcBlock(nn.Module):
    r"""Global context block (GCNet's "GC block" with channel-add fusion), as FGD uses it.

    .. math::
        \mathcal{R}(F) = F + W_{v2}\,\mathrm{ReLU}\Big(\mathrm{LN}\Big(W_{v1}
            \sum_{j=1}^{HW} \frac{e^{W_k F_j}}{\sum_{m=1}^{HW} e^{W_k F_m}}\, F_j\Big)\Big)

    :math:`W_k` (``conv_mask``) is a 1x1 conv C -> 1 giving one logit per pixel, softmaxed
    over the H·W pixels; the context (N,C) is the softmax-weighted mean of the pixel
    features; :math:`W_{v1}` (1x1 conv C -> C_h), LayerNorm over [C_h,1,1], ReLU and
    :math:`W_{v2}` (1x1 conv C_h -> C) form ``channel_add_conv``, whose output (N,C,1,1) is
    added to every pixel. C_h = C // 2 in FGD.

    Initialisation as in FGD's ``reset_parameters``: ``conv_mask`` Kaiming-normal
    (fan_in, ReLU gain) with zero bias, the last conv of ``channel_add_conv`` all zeros (so
    :math:`\mathcal{R}` starts as the identity), the first conv and the LayerNorm with
    PyTorch's defaults. Parameter names (``conv_mask``, ``channel_add_conv.{0,1,3}``) follow
    the authors' modules, minus their ``_s`` / ``_t`` suffix.

    Args:
        channels: C (>= 2).
        hidden_channels: C_h; default C // 2.

    Shapes: :meth:`forward` (N,C,H,W) -> (N,C,H,W); :meth:`context` -> (N,C,1,1);
    :meth:`channel_add` -> (N,C,1,1), the term added to every pixel.
    """

    def __init__(self, channels: int, hidden_channels: Optional[int] = None) -> None:
        super().__init__()
        channels = _check_channels("GcBlock", "channels", channels, 2)
        hidden = channels // 2 if hidden_channels is None else _check_channels(
            "GcBlock", "hidden_channels", hidden_channels, 1)
        self.channels, self.hidden_channels = channels, hidden
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """FGD's initialisation (see the class docstring); the first conv and the LayerNorm keep
        (are reset to) PyTorch's defaults."""
        nn.init.kaiming_normal_(self.conv_mask.weight, a=0, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        self.channel_add_conv[0].reset_parameters()
        self.channel_add_conv[1].reset_parameters()
        nn.init.zeros_(self.channel_add_conv[3].weight)
        nn.init.zeros_(self.channel_add_conv[3].bias)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"GcBlock: the input must be a torch.Tensor (N,C,H,W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"GcBlock: the input must have shape (N,{self.channels},H,W), got {tuple(x.shape)}")

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,1,1): the softmax(W_k F)-weighted sum of the pixel features (GCNet's spatial pool)."""
        self._check(x)
        N, C, H, W = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(N, H * W, 1), dim=1)
        return torch.bmm(x.reshape(N, C, H * W), weights).reshape(N, C, 1, 1)

    def channel_add(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,1,1): :math:`\\mathcal{R}(F) - F`, the transformed context added to every pixel."""
        return self.channel_add_conv(self.context(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\mathcal{R}(F) = F + ` :meth:`channel_add` (F) (N,C,H,W)."""
        return x + self.channel_add(x)


class FGDGlobal(nn.Module):
    r"""The GcBlocks of FGD's global distillation for one FPN level: ``student`` applied to the
    student's (aligned) feature, ``teacher`` to the teacher's.

    FGD's global loss (:func:`kdops.losses.fgd_global_loss`) is
    :math:`\lambda \sum (\mathcal{R}_T(F^T) - \mathcal{R}_S(F^S))^2 / N`. The authors' code
    (``FeatureLoss``: ``conv_mask_s``/``channel_add_conv_s`` and ``conv_mask_t``/
    ``channel_add_conv_t``) uses two independently initialised GcBlocks, both trained
    through this loss (the teacher's features are constants, its GcBlock is not): that is
    the default. The paper (Sec. 3.2, Eq. 9) writes a single :math:`\mathcal{R}`;
    ``shared=True`` uses one GcBlock for both (``teacher`` is then ``None`` and
    :attr:`teacher_block` is ``student``).

    Args:
        channels: C of the teacher's feature (the student's after FGD's ``align``).
        hidden_channels: GcBlock's bottleneck, default C // 2 (FGD).
        shared: one GcBlock for student and teacher (paper) instead of two (code).

    :meth:`forward` (student (N,C,H,W), teacher (N,C,H,W)) returns the two channel-add terms
    ((N,C,1,1), (N,C,1,1)): :math:`\mathcal{R}(F) - F` of each.
    """

    def __init__(self, channels: int, hidden_channels: Optional[int] = None, shared: bool = False) -> None:
        super().__init__()
        if not isinstance(shared, bool):
            raise TypeError(f"FGDGlobal: `shared` must be a bool, got {type(shared).__name__}")
        self.student = GcBlock(channels, hidden_channels)
        self.teacher = None if shared else GcBlock(channels, hidden_channels)

    @property
    def shared(self) -> bool:
        return self.teacher is None

    @property
    def teacher_block(self) -> GcBlock:
        """The GcBlock applied to the teacher's feature."""
        return self.student if self.teacher is None else self.teacher

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""The channel-add terms :math:`\mathcal{R}_S(F^S) - F^S` and :math:`\mathcal{R}_T(F^T) - F^T`
        of FGD's global loss (Yang et al., CVPR 2022, Sec. 3.2).

        Args:
            student: (N,C,H,W) student feature (after FGD's ``align`` when channels differ).
            teacher: (N,C,H,W) teacher feature.

        Returns:
            ((N,C,1,1), (N,C,1,1)): the two terms; the full maps are these plus the inputs
            (broadcast), which :func:`kdops.losses.fgd_global_loss` never materialises.
        """
        return self.student.channel_add(student), self.teacher_block.channel_add(teacher)
