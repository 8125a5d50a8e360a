"""Bench entry mask_pool: pooling under instance-like (K,H,W) masks on the FPN's P3 map, K sweep.

Objects are grouped by image (batch_index sorted), as a detector's per-image targets come
concatenated; kdops then reads each image's masks in place (unsorted objects cost it one
gather of the mask rows). Implementations: kdops; the eager reference (a loop over objects,
the baseline); LGD's own formulation (``aggregate_per_level``: one ``torch.mm`` per image
over that image's slice of the masks); the dense batched product over every (image,
object) pair followed by picking each object's column (kdops' previous torch-ops version);
and torch.compile of that dense form (the object loop and the per-image split read indices
on the host, which torch.compile cannot trace without graph breaks).
"""
from __future__ import annotations

import torch

import kdops
from kdops import reference

from ..problems import fpn, roof_fresh, roof_read
from ..registry import Case, Impl, register
from .box_pool import coco_boxes

K_SWEEP = (1, 10, 100)


def instance_masks(boxes, size, stride, seed: int = 0):
    """(K,H,W) 0/1 masks: each box's pixels (centre rule) filled with a random 0/1 pattern of
    about 70% ones, so masks are irregular blobs inside their boxes."""
    H, W = size
    g = torch.Generator().manual_seed(seed)
    ys = (torch.arange(H) + 0.5) * stride
    xs = (torch.arange(W) + 0.5) * stride
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    inside_y = (y1 < ys) & (ys < y2)  # (K,H)
    inside_x = (x1 < xs) & (xs < x2)  # (K,W)
    box = inside_y[:, :, None] & inside_x[:, None, :]
    return box & (torch.rand(box.shape, generator=g) < 0.7)


def lgd_per_image(feature, masks, batch_index):
    """LGD's aggregate_per_level without its area normalisation: per image, torch.mm of that
    image's (K_n,HW) masks (a slice: objects grouped by image) with its (C,HW) feature
    transposed."""
    N = feature.shape[0]
    flat, mflat = feature.flatten(2), masks.flatten(1)
    counts = torch.bincount(batch_index, minlength=N).tolist()
    return torch.cat([torch.mm(m, flat[n].t()) for n, m in enumerate(mflat.split(counts))])


def dense_pick(feature, masks, batch_index):
    """Every image against every mask, (N,C,K), then object k's column of image b_k."""
    N, C, H, W = feature.shape
    K = masks.shape[0]
    pooled = torch.matmul(feature.reshape(N, C, H * W), masks.reshape(K, H * W).t())
    return pooled[batch_index, :, torch.arange(K, device=feature.device)]


@register("mask_pool")
def cases(device, dtype, size):
    N, C, levels, strides, image = fpn(size)
    (H, W), stride = levels[0], strides[0]
    out = []
    for K in K_SWEEP:
        def make(K=K):
            g = torch.Generator().manual_seed(K)
            boxes, bi = coco_boxes(K, N, image, seed=K)
            bi, order = torch.sort(bi, stable=True)  # objects grouped by image
            boxes = boxes[order]
            return {"feature": torch.randn(N, C, H, W, generator=g).to(device, dtype).requires_grad_(),
                    "masks": instance_masks(boxes, (H, W), stride, seed=K).to(device, dtype),
                    "batch_index": bi.to(device)}

        def min_bytes(inp):
            e = inp["feature"].element_size()
            # fwd reads the map and the masks; bwd reads the masks and writes the map's gradient
            return (2 * inp["feature"].numel() + 2 * inp["masks"].numel()) * e

        def roof(feature, masks, batch_index):
            return roof_read([feature, masks, masks]) + roof_fresh([feature])

        tol = 1e-3 if dtype == torch.float32 else 5e-2
        out.append(Case(
            op="mask_pool", label=f"P3 {H}x{W} N={N} C={C} K={K}", make_inputs=make,
            impls=[Impl("kdops", kdops.mask_pool), Impl("eager (object loop)", reference.mask_pool),
                   Impl("LGD per-image mm", lgd_per_image), Impl("dense (N,C,K) + pick", dense_pick),
                   Impl("compile (dense + pick)", dense_pick, compile=True), Impl("roof", roof, roof=True)],
            grad_inputs=["feature"], min_bytes=min_bytes, atol=tol, rtol=tol, quick=K == 100,
            bound=("read the map once and the masks twice (forward and backward; sums), write the map's "
                   "gradient once (fresh zeros)")))
    return out
