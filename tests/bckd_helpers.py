"""Shared inputs of the BCKD tests: random logits and mmdet's (N,J*C,H,W) head layout."""
from __future__ import annotations

import torch

F64 = torch.float64


def logits(shape, seed, scale=3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def to_nchw(x, N, H, W):
    """(A,C) in (n,h,w,j) order -> mmdet's (N,J*C,H,W) head layout."""
    return x.reshape(N, H, W, -1).permute(0, 3, 1, 2).contiguous()
