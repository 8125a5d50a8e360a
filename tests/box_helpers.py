"""Shared inputs of the box_pool / box_paint / box_ranges tests (FPN sizes, strides and random boxes) and
of the nms_mask tests (clustered candidates, torchvision's NMS as a keep mask)."""
from __future__ import annotations

import torch

SIZES = [(13, 17), (7, 9), (4, 5)]
STRIDES = [8, 16, 32]
IMAGE = (104, 136)


def make_boxes(K=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([150.0, 115.0]) - 10
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * 80
    boxes = torch.cat([xy, xy + wh], 1)
    # border crossers, a zero-area box, a box outside the image, a huge box
    extra = torch.tensor([[-30.0, -20, 40, 30], [50, 40, 50, 90], [300, 300, 400, 420], [-50, -50, 500, 500],
                          [16.0, 24, 40, 56]], dtype=torch.float64)
    boxes = torch.cat([boxes, extra])
    bi = torch.randint(0, 2, (boxes.shape[0],), generator=g)
    return boxes.to(dtype), bi


def make_feats(N=2, C=5, seed=1, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, h, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for h, w in SIZES]


def clustered_boxes(G, K, seed=0, dtype=torch.float64, spread=4.0, clusters=None):
    """(G,K,4) boxes in clusters of ~8 around random centres (many overlap), in random order."""
    g = torch.Generator().manual_seed(seed)
    n = clusters or max(1, -(-K // 8))
    centres = torch.rand(G, n, 2, generator=g, dtype=torch.float64) * 200
    pick = torch.randint(0, n, (G, K), generator=g)
    c = torch.gather(centres, 1, pick[..., None].expand(G, K, 2))
    xy = c + torch.randn(G, K, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(G, K, 2, generator=g, dtype=torch.float64) * 30 + 8
    return torch.cat([xy - wh / 2, xy + wh / 2], 2).to(dtype)


def random_valid(G, K, seed=1, p=0.8):
    return torch.rand(G, K, generator=torch.Generator().manual_seed(seed)) < p


def torchvision_keep(boxes, thr, valid=None):
    """torchvision.ops.nms per group on the valid boxes (values upcast to float64), in the given
    order (scores decreasing with the index), as a (G,K) mask."""
    import pytest

    tv = pytest.importorskip("torchvision.ops")
    G, K = boxes.shape[:2]
    valid = torch.ones(G, K, dtype=torch.bool) if valid is None else valid
    keep = torch.zeros(G, K, dtype=torch.bool)
    for g in range(G):
        idx = valid[g].nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        scores = -torch.arange(idx.numel(), dtype=torch.float64)
        kept = tv.nms(boxes[g, idx].double(), scores, float(thr))
        keep[g, idx[kept]] = True
    return keep
