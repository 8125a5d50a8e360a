"""Eager PyTorch formulas, written from the papers and the authors' code.

They are the test oracle, the baseline of ``kdops bench`` and the fallback on
devices with no kernel. They favour clarity over speed and memory.
"""
from .masked_mse import masked_mse
from .ms_deform_attn import ms_deform_attn
from .pcc_mse import pcc_mse

__all__ = ["masked_mse", "ms_deform_attn", "pcc_mse"]
