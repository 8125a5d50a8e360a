"""kdops: fused, exact kernels for knowledge distillation in object detection.

    import kdops
    loss = kdops.pcc_mse(student_fpn, teacher_fpn)          # (L,) per-level PKD terms
    loss = kdops.masked_mse(s, t, pixel_weight=m, channel_weight=a)

See README.md and ``kdops info`` for which backend each op uses on this machine.
"""
from ._extension import HAS_C
from .ops import masked_mse, ms_deform_attn, pcc_mse
from . import nn
from .version import __version__

__all__ = ["HAS_C", "masked_mse", "ms_deform_attn", "nn", "pcc_mse", "__version__"]
