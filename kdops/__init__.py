"""kdops: fused, exact kernels for knowledge distillation in object detection.

    import kdops
    loss = kdops.pcc_mse(student_fpn, teacher_fpn)          # (L,) per-level PKD terms
    loss = kdops.masked_mse(s, t, pixel_weight=m, channel_weight=a)
    rows = kdops.gather_level_features(student_head, anchor_index)   # (R,C), HEAD's CKD
    emb = kdops.box_pool(student_fpn, gt_boxes, batch, strides)     # (L,K,C), LGD
    fg, bg = kdops.box_masks(gt_boxes, batch, sizes, strides, image_size=(h, w))  # FGD masks

See README.md and ``kdops info`` for which backend each op uses on this machine.
"""
from ._extension import HAS_C
from . import losses, reference
from .ops import (
    box_masks, box_paint, box_pool, box_ranges, gather_level_features, mask_pool, masked_mse, pcc_mse,
)
from .version import __version__

__all__ = [
    "HAS_C", "box_masks", "box_paint", "box_pool", "box_ranges", "gather_level_features", "losses", "mask_pool",
    "masked_mse", "pcc_mse", "reference", "__version__",
]
