"""Eager PyTorch formulas, written from the papers and the authors' code.

They are the test oracle, the baseline of ``kdops bench`` and the fallback on
devices with no kernel. They favour clarity over speed and memory.
"""
from .bckd_cls_loss import bckd_cls_loss
from .bckd_loc_loss import bckd_loc_loss
from .box_masks import box_masks, box_masks_fwd
from .box_pool import box_paint, box_paint_ranges, box_pool, box_pool_ranges
from .box_ranges import box_ranges
from .gather_level_features import gather_level_features
from .mask_pool import mask_pool
from .masked_mse import masked_mse
from .ms_deform_attn import ms_deform_attn
from .nms_mask import nms_mask
from .pcc_mse import pcc_mse
from .roi_align import roi_align, roi_levels

__all__ = [
    "bckd_cls_loss", "bckd_loc_loss", "box_masks", "box_masks_fwd", "box_paint", "box_paint_ranges",
    "box_pool", "box_pool_ranges", "box_ranges", "gather_level_features", "mask_pool", "masked_mse", "ms_deform_attn",
    "nms_mask", "pcc_mse", "roi_align", "roi_levels",
]
