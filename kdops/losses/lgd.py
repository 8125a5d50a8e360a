r"""LGD's distillation loss (Zhang et al., "LGD: Label-Guided Self-Distillation for Object
Detection", AAAI 2022), following the authors' ``BaseDistillator.distill`` (megvii-research/LGD).

The student's FPN features go through an adapter (the release's ``SequentialConvs``: Conv3x3, ReLU,
Conv3x3, ReLU, Conv3x3, 256 channels, one adapter shared across levels, owned by this loss as
``adapter`` and trained with the student); both sides are instance-normalised (``InstanceNorm2d``
without affine: per image and channel over H x W, biased variance, eps 1e-5), each side's levels are
flattened and concatenated per image, and the loss is the mean squared difference times lambda:

.. math::
    \mathcal{L} = \lambda\,\frac{\sum_l N C H_l W_l\; \mathrm{MSE}_l}{\sum_l N C H_l W_l},\qquad
    \mathrm{MSE}_l = \mathrm{mean}\big(\mathrm{IN}(A(S_l)) - \mathrm{IN}(T_l)\big)^2

-- one :func:`kdops.pcc_mse` call with ``norm="instance"`` over all levels, weighted by level size
(no normalised copy is made). The instructive side :math:`T_l` is always detached (the release:
"teacher always detach").

Schedule (the release's ``train.py``, applied by the integrations): for the first
``PRE_NONDISTILL_ITERS`` (20k-30k) the loss is still computed and still trains the adapter, but the
student's features are detached before the adapter (``distill_flag == DISTILL_OFF``): pass
``detach_student=True`` then. Before ``PRE_FREEZE_STUDENT_BACKBONE_ITERS`` the release also drops
the gradients of the student's backbone (not its FPN) from every loss -- the integration's job.
Because the adapter always receives a gradient, the loss never leaves parameters unused.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from .._dtype import FLOAT_DTYPES
from ..ops._validation import check_flag, check_number, check_tensor
from ..ops.pcc_mse import pcc_mse

__all__ = ["LGDLoss"]

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


class LGDLoss(nn.Module):
    r"""LGD's distillation loss with its student adapter (see the module docstring).

    Args:
        channels: FPN channels on both sides (256 in the release).
        loss_weight: lambda (1.0 in the release's configs, ``DISTILLATOR.LAMBDA``).
    """

    def __init__(self, channels: int = 256, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.channels = check_number("LGDLoss", "channels", channels, low=1, integer=True)
        self.loss_weight = check_number("LGDLoss", "loss_weight", loss_weight, low=0.0)
        c = self.channels
        self.adapter = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
                                     nn.Conv2d(c, c, 3, 1, 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, loss_weight={self.loss_weight}"

    def forward(self, student: Feats, instructive: Feats, detach_student: bool = False) -> torch.Tensor:
        r"""LGD's distillation term (Zhang et al., AAAI 2022), the release's ``distill``:
        :math:`\lambda\,\mathrm{MSE}(\mathrm{cat}_l \mathrm{IN}(A(S_l)), \mathrm{cat}_l \mathrm{IN}(T_l))`.

        Args:
            student: the student's FPN maps, (N,C,H,W) or a list of L levels (C = ``channels``).
            instructive: :class:`kdops.nn.LGDInstructiveKnowledge`'s output, the same shapes (detached
                here). The floating dtypes may differ (under autocast the FPN is float16 and the
                instructive maps, ending in a GroupNorm, float32): both are compared in the promoted
                dtype.
            detach_student: no gradient into the student (the adapter still trains): the release's
                ``DISTILL_OFF`` iterations.

        Returns:
            the 0-d loss (float32; float64 for float64 inputs). Levels with no element add exactly
            0; all of them empty: exactly 0, with zero gradients for the adapter.
        """
        op = "LGDLoss"
        detach_student = check_flag(op, "detach_student", detach_student)
        s_seq, t_seq = not isinstance(student, torch.Tensor), not isinstance(instructive, torch.Tensor)
        for name, x, seq in (("student", student, s_seq), ("instructive", instructive, t_seq)):
            if seq and not isinstance(x, (list, tuple)):
                raise TypeError(f"{op}: `{name}` must be an (N,C,H,W) tensor or a list of them, got {type(x).__name__}")
        s_list = list(student) if s_seq else [student]
        t_list = list(instructive) if t_seq else [instructive]
        if not s_list or len(s_list) != len(t_list):
            raise ValueError(f"{op}: `instructive` must have one level per level of `student` (at least one), got "
                             f"{len(s_list)} student and {len(t_list)} instructive levels")
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            sfx = f"[{i}]" if s_seq else ""
            check_tensor(op, f"student{sfx}", s, ndim=4, dtypes=FLOAT_DTYPES, like=s_list[0], what="(N,C,H,W)")
            check_tensor(op, f"instructive{sfx}", t, ndim=4, dtypes=FLOAT_DTYPES, like=s, what="(N,C,H,W)")
            if s.shape[1] != self.channels:
                raise ValueError(f"{op}: `student{sfx}` has {s.shape[1]} channels, the adapter was built for "
                                 f"{self.channels}")
            if s.shape != t.shape:
                raise ValueError(f"{op}: `instructive{sfx}` must have the shape of `student{sfx}` {tuple(s.shape)}, "
                                 f"got {tuple(t.shape)}")
        # a level without elements skips the adapter (a 3x3 conv refuses H or W = 0) and adds 0
        adapted = [(s.detach() if detach_student else s) if s.numel() == 0 else
                   self.adapter(s.detach() if detach_student else s) for s in s_list]
        pairs = []
        for a, t in zip(adapted, t_list):
            dt = torch.promote_types(a.dtype, t.dtype)
            pairs.append((a.to(dt), t.detach().to(dt)))
        total = sum(a.numel() for a in adapted)  # shapes only: no device read
        if total == 0:  # exactly 0, with zero (not missing) gradients for the adapter
            per_level = pcc_mse([a for a, _ in pairs], [t for _, t in pairs], norm="instance")
            return per_level.sum() * 0.0 + sum(p.reshape(-1)[:0].sum() for p in self.adapter.parameters())
        # (L,) means weighted by level size and the loss weight, folded into the op: with
        # loss.backward() over a sum of losses the CPU backward has nothing left to scale
        weights = [self.loss_weight * a.numel() / total for a in adapted]
        return pcc_mse([a for a, _ in pairs], [t for _, t in pairs], norm="instance", scale=weights).sum()
