"""Modules built on kdops ops (drop-in replacements of the layers detectors already use)."""
from .fgd import FGDGlobal, GcBlock
from .lgd import LGDInstructiveKnowledge, LGDLabelEncoder, lgd_descriptors
from .ms_deform_attn import MSDeformAttn
from .unikd import AdaptiveKnowledgeExtractor, UniKDAdaptor, UniKDDecoderLayer

__all__ = [
    "AdaptiveKnowledgeExtractor", "FGDGlobal", "GcBlock", "LGDInstructiveKnowledge", "LGDLabelEncoder", "MSDeformAttn",
    "UniKDAdaptor", "UniKDDecoderLayer", "lgd_descriptors",
]
