"""kdops.mask_pool: per-object sums of a feature map under arbitrary (K,H,W) masks."""
from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, check_index_tensor, check_tensor

OP = "mask_pool"


def mask_pool(feature: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    r"""Pools each object's feature under its own mask (instance segmentation masks).

    .. math::
        \mathrm{out}[k, c] = \sum_{y,x} M_k[y,x]\, F[b_k, c, y, x]

    LGD's instance-segmentation variant pools features under per-object masks instead of
    boxes. The kernel is one batched product ``F[n] (C,HW) @ M^T (HW,K)`` for every image,
    followed by picking column k of image b_k: exact, differentiable in both the feature
    and the masks, and its only intermediate is (N,C,K) -- smaller than the inputs for
    the usual N of 2-16. Boxes with an out-of-range batch index pool to 0 (no host check).

    Args:
        feature: (N,C,H,W) floating.
        masks: (K,H,W) floating, bool or uint8 (cast to the feature's dtype; gradients flow
            to floating masks).
        batch_index: (K,) int64.

    Returns:
        (K,C) in the feature's dtype.
    """
    check_tensor(OP, "feature", feature, ndim=4, what="(N,C,H,W)")
    N, C, H, W = feature.shape
    check_tensor(OP, "masks", masks, ndim=3, dtypes=FLOAT_DTYPES + (torch.bool, torch.uint8), like=feature,
                 what="(K,H,W)")
    K = masks.shape[0]
    if masks.shape[1:] != (H, W):
        raise ValueError(f"kdops.{OP}: `masks` must have shape (K,{H},{W}) to match `feature`, got {tuple(masks.shape)}")
    check_index_tensor(OP, "batch_index", batch_index, like=feature, shape=(K,), what="(K,) image of each mask")
    if N == 0:
        return feature.new_zeros((K, C))
    pooled = torch.matmul(feature.reshape(N, C, H * W), masks.to(feature.dtype).reshape(K, H * W).t())  # (N,C,K)
    valid = (batch_index >= 0) & (batch_index < N)
    b = batch_index.clamp(0, N - 1)
    out = pooled[b, :, torch.arange(K, device=feature.device)]  # (K,C)
    return out * valid.to(out.dtype)[:, None]
