"""Modules built on kdops ops (drop-in replacements of the layers detectors already use)."""
from .ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn"]
