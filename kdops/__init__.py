"""kdops: fused, exact kernels for knowledge distillation in object detection.

    import kdops
    loss = kdops.pcc_mse(student_fpn, teacher_fpn)          # (L,) per-level PKD terms
    loss = kdops.masked_mse(s, t, pixel_weight=m, channel_weight=a)
    rows = kdops.gather_level_features(student_head, anchor_index)   # (R,C), HEAD's CKD
    rois_feat = kdops.roi_align(fpn, rois, strides=[4, 8, 16, 32])    # (R,C,7,7), an R-CNN head's input
    keep = kdops.nms_mask(sorted_boxes, 0.7, valid)                 # (G,K) bool, greedy NMS, no host sync
    emb = kdops.box_pool(student_fpn, gt_boxes, batch, strides)     # (L,K,C), LGD
    fg, bg = kdops.box_masks(gt_boxes, batch, sizes, strides, image_size=(h, w))  # FGD masks
    kdops.check_boxes(gt_boxes, batch, num_images)   # warns (or raises) on boxes that cover nothing

See README.md, docs/architecture.md and ``kdops info`` for which backend each op uses on this machine.
"""
from ._extension import HAS_C
from . import losses, nn, reference
from .ops import (
    bckd_cls_loss, bckd_loc_loss, box_masks, box_paint, box_pool, box_ranges, gather_level_features, mask_pool,
    masked_mse, ms_deform_attn, nms_mask, pcc_mse, roi_align,
)
from .ops.box_ranges import check_boxes  # noqa: E402  (kdops.ops' box_ranges module)
from .version import __version__

__all__ = [
    "HAS_C", "bckd_cls_loss", "bckd_loc_loss", "box_masks", "box_paint", "box_pool", "box_ranges", "check_boxes",
    "gather_level_features", "losses", "mask_pool", "masked_mse", "ms_deform_attn", "nms_mask", "nn", "pcc_mse",
    "reference", "roi_align", "__version__",
]
