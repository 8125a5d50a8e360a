"""Shared inputs of the box_pool / box_paint / box_ranges tests: FPN sizes, strides and random boxes."""
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
