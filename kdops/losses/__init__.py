"""Paper-level distillation losses built on kdops.ops."""
from .bckd import BCKDLoss
from .feature_mimic import FeatureMimicLoss, fgd_attention
from .fgd import FGD_PRESETS, FGDLoss, fgd_attention_loss, fgd_attention_maps, fgd_global_loss
from .head import (
    HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, HEADDenseLoss, HEADMemoryPool, HEADPaddedProposals,
    HEADProposals, head_gt_sources, head_proposals,
)
from .head_sampling import HEADRoISamples, head_box_iou, head_pad_gt, head_rcnn_loss, head_sample_rois
from .lgd import LGDLoss
from .pkd import PKDLoss
from .unikd import (
    UniKDLoss, UniKDMatchingLoss, content_positive_mask, hungarian_match, sample_positional_boxes,
    unikd_decoupled_mse, xyxy_to_normalized_cxcywh,
)

__all__ = [
    "BCKDLoss", "FGDLoss", "FGD_PRESETS", "FeatureMimicLoss", "HEADAKDLoss", "HEADCKDLoss", "HEADContrastiveCKDLoss",
    "HEADDenseLoss", "HEADMemoryPool", "HEADPaddedProposals", "HEADProposals", "HEADRoISamples", "LGDLoss", "PKDLoss",
    "fgd_attention", "fgd_attention_loss",
    "fgd_attention_maps", "fgd_global_loss", "head_box_iou", "head_gt_sources", "head_pad_gt", "head_proposals", "head_rcnn_loss",
    "head_sample_rois",
    "UniKDLoss", "UniKDMatchingLoss", "content_positive_mask", "hungarian_match", "sample_positional_boxes",
    "unikd_decoupled_mse", "xyxy_to_normalized_cxcywh",
]
