"""Triton kernel of kdops::box_masks_fwd (the CUDA backend of kdops.box_masks' foreground).

out[n,y,x] = max(0, max of weight[k] over the boxes k of image n covering (y,x)).

One program per (box, block of BLOCK_H of the box's rows): it loops over the box's columns
in tiles of BLOCK_H x BLOCK_W and ``tl.atomic_max``-es the box's weight into a zero-filled
float32 buffer (float64 for float64 output). Programs whose rows lie below the box, and
boxes that are empty after clipping, have weight <= 0 or an out-of-range batch index, exit
at once; the grid (K, cdiv(H, BLOCK_H)) depends on shapes only, so nothing is read on the
host (no sync). Rows and columns are masked to the clipped box: nothing out of bounds.

Determinism: max is commutative and associative and exact (no rounding), so whatever order
the atomics land in, every pixel ends as the exact max of the weights covering it: the
result is bitwise reproducible. The weights are rounded to the output dtype on the host
first (fp16/bf16 values are exact in float32), so the final cast is exact and the result
equals the CPU kernel's bit for bit. These are Triton atomics, not a PyTorch op flagged
nondeterministic, so torch.use_deterministic_algorithms(True) does not object (and need not).
Cost O(N·H·W + sum of box areas / BLOCK) work; no per-box H×W mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, device_guard
from .._dtype import acc_dtype


@triton.jit
def _max_paint_kernel(rng_ptr, w_ptr, bi_ptr, buf_ptr, N, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    n = tl.load(bi_ptr + k)
    w = tl.load(w_ptr + k)
    x0 = tl.maximum(tl.load(rng_ptr + 4 * k), 0)
    y0 = tl.maximum(tl.load(rng_ptr + 4 * k + 1), 0)
    x1 = tl.minimum(tl.load(rng_ptr + 4 * k + 2), W - 1)
    y1 = tl.minimum(tl.load(rng_ptr + 4 * k + 3), H - 1)
    y_start = y0 + tl.program_id(1) * BLOCK_H
    ok = (n >= 0) & (n < N) & (x0 <= x1) & (y_start <= y1) & (w > 0)
    if ok:
        ys = y_start + tl.arange(0, BLOCK_H)
        row = buf_ptr + (n * H + ys) * W
        ym = ys <= y1
        val = tl.zeros([BLOCK_H, BLOCK_W], dtype=w.dtype) + w
        for xs0 in range(x0, x1 + 1, BLOCK_W):
            xs = xs0 + tl.arange(0, BLOCK_W)
            m = ym[:, None] & (xs <= x1)[None, :]
            tl.atomic_max(row[:, None] + xs[None, :], val, mask=m, sem="relaxed")


def _blocks(H: int, W: int):
    """(BLOCK_H, BLOCK_W): a few rows of up to 128 columns on a GPU; big tiles under the
    interpreter (~5 ms per program instance there)."""
    if INTERPRET:
        return min(64, triton.next_power_of_2(max(H, 1))), min(1024, triton.next_power_of_2(max(W, 1)))
    return 4, min(128, max(32, triton.next_power_of_2(max(W, 1))))


def box_masks_fwd(ranges, weight, batch_index, N, H, W, dtype):
    """Same contract as the kdops::box_masks_fwd schema (csrc/ops.cpp)."""
    N, H, W = int(N), int(H), int(W)
    acc = acc_dtype(dtype)
    buf = torch.zeros((N, H, W), device=ranges.device, dtype=acc)
    K = ranges.shape[0]
    if K == 0 or buf.numel() == 0:
        return buf if dtype == acc else buf.to(dtype)
    # rounded to the output dtype first: the max and the final cast are then exact
    w = weight.to(dtype).to(acc).contiguous()
    BLOCK_H, BLOCK_W = _blocks(H, W)
    with device_guard(ranges):
        _max_paint_kernel[(K, triton.cdiv(H, BLOCK_H))](
            ranges.contiguous(), w, batch_index.contiguous(), buf, N, H, W, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return buf if dtype == acc else buf.to(dtype)
