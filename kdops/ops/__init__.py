"""The public kernel API: validation, documentation and autograd over torch.ops.kdops.*."""
from .masked_mse import masked_mse
from .ms_deform_attn import ms_deform_attn
from .pcc_mse import pcc_mse

__all__ = ["masked_mse", "ms_deform_attn", "pcc_mse"]
