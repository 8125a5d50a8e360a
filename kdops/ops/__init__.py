"""The public kernel API: validation, documentation and autograd over torch.ops.kdops.*."""
from .masked_mse import masked_mse
from .pcc_mse import pcc_mse

__all__ = ["masked_mse", "pcc_mse"]
