"""Paper-level distillation losses built on kdops.ops."""
from .bckd import BCKDLoss
from .feature_mimic import FeatureMimicLoss, fgd_attention
from .fgd import FGD_PRESETS, FGDLoss, fgd_attention_loss, fgd_attention_maps, fgd_global_loss
from .head import (
    HEADAKDLoss, HEADCKDLoss, HEADContrastiveCKDLoss, HEADDenseLoss, HEADMemoryPool, HEADProposals, head_gt_sources,
    head_proposals,
)
from .pkd import PKDLoss

__all__ = [
    "BCKDLoss", "FGDLoss", "FGD_PRESETS", "FeatureMimicLoss", "HEADAKDLoss", "HEADCKDLoss", "HEADContrastiveCKDLoss",
    "HEADDenseLoss", "HEADMemoryPool", "HEADProposals", "PKDLoss", "fgd_attention", "fgd_attention_loss",
    "fgd_attention_maps", "fgd_global_loss", "head_gt_sources", "head_proposals",
]
