"""Triton kernels of kdops::gather_level_features_fwd / _bwd (the CUDA backend).

Forward: one launch per level; a program reads a block of index rows and a block of
channels, and writes the rows that belong to its level (masked loads: rows out of range
read nothing and stay zero). Backward: the deterministic sorted segment reduction of
kdops/triton/_segments.py (no float atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import constant
from . import device_guard
from ._segments import segment_scatter


@triton.jit
def _gather_kernel(f_ptr, idx_ptr, out_ptr, R, C, lvl, N, H, W, s_n, s_c, s_h, s_w,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    l = tl.load(idx_ptr + rows * 4, mask=rm, other=-1)
    b = tl.load(idx_ptr + rows * 4 + 1, mask=rm, other=-1)
    y = tl.load(idx_ptr + rows * 4 + 2, mask=rm, other=-1)
    x = tl.load(idx_ptr + rows * 4 + 3, mask=rm, other=-1)
    ok = rm & (l == lvl) & (b >= 0) & (b < N) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    base = b * s_n + y * s_h + x * s_w
    m = ok[:, None] & (cols < C)[None, :]
    v = tl.load(f_ptr + base[:, None] + cols[None, :].to(tl.int64) * s_c, mask=m, other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], v, mask=m)


def gather_level_features_fwd(features, index):
    """Same contract as the kdops::gather_level_features_fwd schema (csrc/ops.cpp)."""
    idx = index.contiguous()
    R, C = idx.shape[0], features[0].shape[1]
    out = features[0].new_zeros((R, C))
    if R == 0 or C == 0:
        return out
    BLOCK_R, BLOCK_C = 32, min(128, triton.next_power_of_2(C))
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    with device_guard(out):
        for lvl, f in enumerate(features):
            N, _, H, W = f.shape
            if f.numel() == 0:
                continue
            _gather_kernel[grid](f, idx, out, R, C, lvl, N, H, W, *f.stride(), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return out


def row_keys(index, sizes):
    """Global destination key of every index row (-1 when out of range) and each level's offset."""
    offsets, total = [], 0
    for N, H, W in sizes:
        offsets.append(total)
        total += N * H * W
    lim = constant([[N, H, W] for N, H, W in sizes], like=index, dtype=torch.int64)
    off = constant(offsets, like=index, dtype=torch.int64)
    lvl = index[:, 0]
    lc = lvl.clamp(0, len(sizes) - 1)
    L3 = lim[lc]
    ok = (lvl >= 0) & (lvl < len(sizes)) & (index[:, 1:] >= 0).all(1) & (index[:, 1:] < L3).all(1)
    key = off[lc] + (index[:, 1] * L3[:, 1] + index[:, 2]) * L3[:, 2] + index[:, 3]
    return torch.where(ok, key, -1), offsets


def gather_level_features_bwd(grad, index, sizes):
    """Same contract as the kdops::gather_level_features_bwd schema (csrc/ops.cpp)."""
    sizes = [int(s) for s in sizes]
    dims = [sizes[i:i + 4] for i in range(0, len(sizes), 4)]
    outs = [grad.new_zeros(tuple(d)) for d in dims]
    if index.shape[0] == 0:
        return outs
    keys, offsets = row_keys(index, [(d[0], d[2], d[3]) for d in dims])
    rows = torch.arange(index.shape[0], device=index.device)
    return segment_scatter(grad.contiguous(), rows, None, keys, outs, offsets)
