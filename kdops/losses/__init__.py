"""Paper-level distillation losses built on kdops.ops."""
from .bckd import BCKDLoss
from .feature_mimic import FeatureMimicLoss, fgd_attention
from .fgd import FGD_PRESETS, FGDLoss, fgd_attention_loss, fgd_attention_maps, fgd_global_loss
from .head import (
    HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, HEADDenseLoss, HEADMemoryPool, HEADProposals, head_gt_sources,
    head_proposals,
)
from .lgd import LGDLoss
from .pkd import PKDLoss
from .unikd import (
    UniKDLoss, UniKDMatchingLoss, content_positive_mask, hungarian_match, sample_positional_boxes,
    unikd_decoupled_mse, xyxy_to_normalized_cxcywh,
)

__all__ = [
    "BCKDLoss", "FGDLoss", "FGD_PRESETS", "FeatureMimicLoss", "HEADAKDLoss", "HEADCKDLoss", "HEADContrastiveCKDLoss",
    "HEADDenseLoss", "HEADMemoryPool", "HEADProposals", "LGDLoss", "PKDLoss", "fgd_attention", "fgd_attention_loss",
    "fgd_attention_maps", "fgd_global_loss", "head_gt_sources", "head_proposals",
    "UniKDLoss", "UniKDMatchingLoss", "content_positive_mask", "hungarian_match", "sample_positional_boxes",
    "unikd_decoupled_mse", "xyxy_to_normalized_cxcywh",
]
