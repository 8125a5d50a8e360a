"""Eager PyTorch formulas, written from the papers and the authors' code.

They are the test oracle, the baseline of ``kdops bench`` and the fallback on
devices with no kernel. They favour clarity over speed and memory.
"""
from .bckd import bckd_cls_loss, bckd_loc_loss
from .masked_mse import masked_mse
from .pcc_mse import pcc_mse

__all__ = ["bckd_cls_loss", "bckd_loc_loss", "masked_mse", "pcc_mse"]
