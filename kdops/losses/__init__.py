"""Paper-level distillation losses built on kdops.ops."""
from .feature_mimic import FeatureMimicLoss, fgd_attention
from .pkd import PKDLoss

__all__ = ["FeatureMimicLoss", "PKDLoss", "fgd_attention"]
