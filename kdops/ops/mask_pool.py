r"""kdops.mask_pool: per-object sums of a feature map under arbitrary (K,H,W) masks.

With :math:`M_k` the mask of object k and :math:`b_k` its image,

.. math::
    \mathrm{out}[k, c] = \sum_{y,x} M_k[y,x]\, F[b_k, c, y, x],

    \frac{\partial L}{\partial F[n, c]} = \sum_{k: b_k = n} g[k, c]\, M_k, \qquad
    \frac{\partial L}{\partial M_k} = \sum_c g[k, c]\, F[b_k, c]

with :math:`g = \partial L / \partial \mathrm{out}`. Per image this is one matrix product
over the image's objects, (K_n,HW) @ (HW,C), exactly LGD's ``aggregate_per_level``
(``torch.mm(inst_masks[b], feat[b].T)`` per image, before its division by the mask area).
The kernels (``kdops::mask_pool_fwd`` / ``_bwd``: C++ on the CPU, Triton on CUDA) group the
objects by image themselves, so the cost is O(K·C·H·W) and nothing of size (N,C,K) or
(N,K,H,W) is formed; the backward is deterministic (per-image segments, no atomics).
"""
from __future__ import annotations

import torch

from .. import reference
from .._dtype import FLOAT_DTYPES
from ._registry import register_op, use_kernel
from ._validation import check_index_tensor, check_tensor

OP = "mask_pool"


def mask_pool(feature: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    r"""Pools each object's feature under its own mask (instance segmentation masks).

    .. math::
        \mathrm{out}[k, c] = \sum_{y,x} M_k[y,x]\, F[b_k, c, y, x]

    LGD (Zhang et al., "LGD: Label-Guided Self-Distillation for Object Detection", AAAI
    2022) builds each object's appearance embedding by pooling the student's FPN features
    under the object's mask -- its box mask, or its instance-segmentation mask when the
    label maps are loaded -- one ``torch.mm`` per image (``aggregate_per_level``; divide by
    ``masks.sum((1, 2)).clamp(min=1)`` for its normalised version). Rectangular box masks
    are cheaper with :func:`kdops.box_pool`.

    Cost (CPU): per image, GEMMs over bands of whole rows, each with only the masks that have
    a nonzero row in the band -- instance masks are zero outside their box, so the work is
    the objects' row spans times the width, not K x H x W -- and the map's gradient is
    written as exact zeros in bands that no mask meets. A NaN/Inf of the map reaches the
    objects whose masks meet its band (0 x Inf is NaN, as in the dense product), no other.

    Args:
        feature: (N,C,H,W) floating.
        masks: (K,H,W) floating, bool or uint8. Floating masks get gradients (a float mask
            of another dtype is cast to the feature's dtype first, differentiably);
            bool/uint8 masks are cast to the feature's dtype and get none.
        batch_index: (K,) int64 image of each mask. An object whose batch index is out of
            range pools to 0 and receives no gradient (not checked on the host: no sync).

    Returns:
        (K,C) in the feature's dtype, accumulated in float32 (float64 for float64).
    """
    check_tensor(OP, "feature", feature, ndim=4, what="(N,C,H,W)")
    N, C, H, W = feature.shape
    check_tensor(OP, "masks", masks, ndim=3, dtypes=FLOAT_DTYPES + (torch.bool, torch.uint8), like=feature,
                 what="(K,H,W)")
    K = masks.shape[0]
    if masks.shape[1:] != (H, W):
        raise ValueError(f"kdops.{OP}: `masks` must have shape (K,{H},{W}) to match `feature`, got {tuple(masks.shape)}")
    check_index_tensor(OP, "batch_index", batch_index, like=feature, shape=(K,), what="(K,) image of each mask")
    m = masks if masks.dtype == feature.dtype else masks.to(feature.dtype)
    if not use_kernel(OP, feature.device):
        return reference.mask_pool(feature, m, batch_index)
    return torch.ops.kdops.mask_pool_fwd(feature, m, batch_index)


def _fake_fwd(feature, masks, batch_index):
    return feature.new_empty((masks.shape[0], feature.shape[1]))


def _fake_bwd(grad, feature, masks, batch_index, grad_feature, grad_masks):
    gf = feature.new_empty(feature.shape) if grad_feature else feature.new_empty((0,))
    gm = masks.new_empty(masks.shape) if grad_masks else masks.new_empty((0,))
    return gf, gm


def _setup(ctx, inputs, output):
    feature, masks, batch_index = inputs
    ctx.save_for_backward(feature, masks, batch_index)


def _backward(ctx, grad):
    feature, masks, batch_index = ctx.saved_tensors
    need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gf, gm = torch.ops.kdops.mask_pool_bwd(grad, feature, masks, batch_index, need_f, need_m)
    return (gf if need_f else None), (gm if need_m else None), None


def _bwd_setup(ctx, inputs, output):
    grad, feature, masks, batch_index, grad_feature, grad_masks = inputs
    ctx.flags = (grad_feature, grad_masks)
    ctx.save_for_backward(grad, feature, masks, batch_index)


def _bwd_backward(ctx, ggf, ggm):
    # The backward is bilinear: (g, M) -> grad_F and (g, F) -> grad_M, so its own gradient
    # is made of the same two ops (higher-order gradients, e.g. gradgradcheck, work).
    grad, feature, masks, bi = ctx.saved_tensors
    has_f, has_m = ctx.flags
    use_f = has_f and ggf is not None and ggf.numel() == feature.numel()
    use_m = has_m and ggm is not None and ggm.numel() == masks.numel()
    need_g, need_f, need_m = ctx.needs_input_grad[:3]
    d_grad = d_feature = d_masks = None
    if need_g:
        d_grad = torch.zeros_like(grad)
        if use_f:
            d_grad = d_grad + torch.ops.kdops.mask_pool_fwd(ggf, masks, bi)
        if use_m:
            d_grad = d_grad + torch.ops.kdops.mask_pool_fwd(feature, ggm, bi)
    if need_f and use_m:
        d_feature = torch.ops.kdops.mask_pool_bwd(grad, feature, ggm, bi, True, False)[0]
    if need_m and use_f:
        d_masks = torch.ops.kdops.mask_pool_bwd(grad, ggf, masks, bi, False, True)[1]
    return d_grad, d_feature, d_masks, None, None, None


register_op(OP, fake={"mask_pool_fwd": _fake_fwd, "mask_pool_bwd": _fake_bwd},
            autograd={"mask_pool_fwd": (_backward, _setup), "mask_pool_bwd": (_bwd_backward, _bwd_setup)})
