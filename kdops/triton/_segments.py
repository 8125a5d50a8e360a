"""Deterministic scatter-add of rows into (N,C,H,W) maps: a sorted segment reduction.

Shared by the gather backward (rows -> their pixels) and box painting (signed box
values -> the corners of a difference array). The entries are sorted by destination
with a stable torch.sort (no host sync); one program per (entry, channel block) that
starts a run of equal keys sums the run in order in fp32 (fp64 for fp64) and writes
once. No float atomics, so results are bitwise reproducible and independent of
`torch.are_deterministic_algorithms_enabled()`. The run length is data dependent (a
`while` over the sorted keys); heavily duplicated destinations serialise in one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard, tl_acc_dtype


@triton.jit
def _segment_sum_kernel(src_ptr, row_ptr, coef_ptr, key_ptr, out_ptr, J, C, key_lo, key_hi, HW,
                        HAS_COEF: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    k = tl.load(key_ptr + j)
    prev = tl.load(key_ptr + j - 1, mask=j > 0, other=-1)
    if (k != prev) & (k >= key_lo) & (k < key_hi):
        acc = tl.zeros([BLOCK_C], ACC)
        i = j
        kk = k
        while kk == k:
            r = tl.load(row_ptr + i)
            v = tl.load(src_ptr + r * C + cols, mask=cm, other=0.0).to(ACC)
            if HAS_COEF:
                v = v * tl.load(coef_ptr + i).to(ACC)
            acc += v
            i += 1
            kk = tl.load(key_ptr + i, mask=i < J, other=-1)
        pix = k - key_lo
        n = pix // HW
        yx = pix - n * HW
        tl.store(out_ptr + n * C * HW + cols.to(tl.int64) * HW + yx, acc.to(out_ptr.dtype.element_ty), mask=cm)


def segment_scatter(src, rows, coef, keys, outs, key_offsets):
    """outs[l] (zero-initialised (N,C,H,W), contiguous) += rows of src at their keys.

    src (M,C) contiguous; rows (J,) int64 source row of each entry; coef (J,) or None;
    keys (J,) int64 global destination key (level offset + (n*H + y)*W + x), or -1 to drop.
    """
    J = keys.numel()
    if J == 0 or src.shape[1] == 0:
        return outs
    skeys, order = torch.sort(keys, stable=True)
    srows = rows[order].contiguous()
    scoef = coef[order].contiguous() if coef is not None else skeys
    C = src.shape[1]
    BLOCK_C = min(256, triton.next_power_of_2(C))
    with device_guard(src):
        for out, lo in zip(outs, key_offsets):
            N, _, H, W = out.shape
            if out.numel() == 0:
                continue
            _segment_sum_kernel[(J, triton.cdiv(C, BLOCK_C))](
                src, srows, scoef, skeys, out, J, C, lo, lo + N * H * W, H * W,
                HAS_COEF=coef is not None, ACC=tl_acc_dtype(src.dtype), BLOCK_C=BLOCK_C, num_warps=1)
    return outs
