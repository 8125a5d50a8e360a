"""Paper-level distillation losses built on kdops.ops."""
from .bckd import BCKDLoss
from .feature_mimic import FeatureMimicLoss, fgd_attention
from .pkd import PKDLoss

__all__ = ["BCKDLoss", "FeatureMimicLoss", "PKDLoss", "fgd_attention"]
