"""Modules built on kdops ops (drop-in replacements of the layers detectors already use)."""
from .fgd import FGDGlobal, GcBlock
from .ms_deform_attn import MSDeformAttn

__all__ = ["FGDGlobal", "GcBlock", "MSDeformAttn"]
