"""The public kernel API: validation, documentation and autograd over torch.ops.kdops.*."""
from .bckd import bckd_cls_loss, bckd_loc_loss
from .masked_mse import masked_mse
from .pcc_mse import pcc_mse

__all__ = ["bckd_cls_loss", "bckd_loc_loss", "masked_mse", "pcc_mse"]
