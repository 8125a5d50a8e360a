"""kdops: fused, exact kernels for knowledge distillation in object detection.

    import kdops
    loss = kdops.pcc_mse(student_fpn, teacher_fpn)          # (L,) per-level PKD terms
    loss = kdops.masked_mse(s, t, pixel_weight=m, channel_weight=a)

See README.md and ``kdops info`` for which backend each op uses on this machine.
"""
from ._extension import HAS_C
from .ops import bckd_cls_loss, bckd_loc_loss, masked_mse, pcc_mse
from .version import __version__

__all__ = ["HAS_C", "bckd_cls_loss", "bckd_loc_loss", "masked_mse", "pcc_mse", "__version__"]
