r"""LGD's distillation loss (Zhang et al., "LGD: Label-Guided Self-Distillation for Object
Detection", AAAI 2022), following the authors' ``BaseDistillator.distill``.

The student's FPN features go through an adapter (Conv3x3, ReLU, Conv3x3, ReLU, Conv3x3, shared
across levels); both sides are instance-normalised (``InstanceNorm2d`` without affine: per image and
channel over H x W, biased variance, eps 1e-5), each side's levels are flattened and concatenated per
image, and the loss is the mean squared difference times lambda:

.. math::
    \mathcal{L} = \lambda\,\frac{\sum_l N C H_l W_l\; \mathrm{MSE}_l}{\sum_l N C H_l W_l},\qquad
    \mathrm{MSE}_l = \mathrm{mean}\big(\mathrm{IN}(A(S_l)) - \mathrm{IN}(T_l)\big)^2

-- one :func:`kdops.pcc_mse` call with ``norm="instance"`` over all levels, weighted by level size.
The instructive side :math:`T_l` is always detached. The release's schedule keeps the loss on but
detaches the student's side for its first 30k iterations (only the adapter trains): pass
``detach_student=True`` for that.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from ..ops._validation import check_flag, check_number
from ..ops.pcc_mse import pcc_mse

__all__ = ["LGDLoss"]

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


class LGDLoss(nn.Module):
    r"""LGD's distillation loss with its student adapter (see the module docstring).

    Args:
        channels: FPN channels on both sides (256 in the release).
        loss_weight: lambda (1.0 in the release).
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
        """Args:
            student: the student's FPN maps, (N,C,H,W) or a list of L levels.
            instructive: :class:`kdops.nn.LGDInstructiveKnowledge`'s output, same shapes (detached here).
            detach_student: no gradient into the student (the adapter still trains): the release's
                first iterations.

        Returns:
            the 0-d loss (float32; float64 for float64 inputs).
        """
        op = "LGDLoss"
        detach_student = check_flag(op, "detach_student", detach_student)
        s_list = [student] if isinstance(student, torch.Tensor) else list(student)
        t_list = [instructive] if isinstance(instructive, torch.Tensor) else list(instructive)
        if not s_list or len(s_list) != len(t_list):
            raise ValueError(f"{op}: `student` and `instructive` must have the same (non-zero) number of levels, got "
                             f"{len(s_list)} and {len(t_list)}")
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            for name, x in (("student", s), ("instructive", t)):
                if not isinstance(x, torch.Tensor) or x.dim() != 4:
                    raise TypeError(f"{op}: `{name}[{i}]` must be an (N,C,H,W) tensor, got "
                                    f"{getattr(x, 'shape', type(x).__name__)}")
            if s.shape != t.shape:
                raise ValueError(f"{op}: level {i}: `student` {tuple(s.shape)} and `instructive` {tuple(t.shape)} "
                                 f"must have one shape")
            if s.shape[1] != self.channels:
                raise ValueError(f"{op}: level {i} has {s.shape[1]} channels, the adapter was built for "
                                 f"{self.channels}")
        adapted = [self.adapter(s.detach() if detach_student else s) for s in s_list]
        targets = [t.detach().to(a.dtype) for t, a in zip(t_list, adapted)]
        per_level = pcc_mse(adapted, targets, norm="instance")  # (L,) means
        total = sum(a.numel() for a in adapted)  # shapes only: no device read
        if total == 0:
            return per_level.sum() * 0.0
        loss = sum(per_level[i] * (a.numel() / total) for i, a in enumerate(adapted))
        return loss * self.loss_weight
