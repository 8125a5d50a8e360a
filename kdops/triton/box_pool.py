"""Triton kernels of kdops::box_pool_fwd and kdops::box_paint_fwd (the CUDA backend).

- ``_sat_kernel``: one program per (n,c) plane walks the rows, a tile of up to 8 rows per
  step (8 loads in flight instead of 1), carrying the running column sums in registers, and
  writes the row-wise ``tl.cumsum`` of them: the inclusive summed-area table S.
- pool = SAT of the features into an fp32 (fp64 for fp64) buffer of the features'
  shape, of which only the rows a box query reads are written (a box's last row and the
  row above its first: with few boxes, the pass is little more than one read of the
  maps), then ``_box_query_kernel``: per (box, channel block) four corner reads.
  An fp32 table carries ~1e-7 of the plane's running total, so a box sum has an
  absolute error of about 1e-7 x |plane sum| (the CPU kernel uses float64).
- paint = ``_paint_kernel``: the same walk down each plane, whose difference-array tiles are
  built on the fly from the boxes' signed corner entries (sorted by destination with a
  stable ``torch.sort``; a step's entries are one contiguous range), added in key order
  (no atomics); each output pixel is written once, in the values' dtype. No dense
  difference array, no zero fill, no cast pass.
Cost O(N·C·H·W + K·C) per level for pool, O(N·C·H·W + K·C·W·8) for paint (each corner
entry is added across its step's tile); no per-box masks. Everything is Triton except the
stable ``torch.sort`` of the 4K corner keys and a few O(K) index computations.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._device import constant
from . import device_guard, tl_acc_dtype
from .._dtype import acc_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _plane_program(C, W, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
    """This program's (n,c) plane (p = n*C + c), its column and tile-row offsets, the column mask."""
    p = tl.program_id(0).to(tl.int64)
    n = p // C
    xs = tl.arange(0, BLOCK_W)
    return p, n, p - n * C, xs, tl.arange(0, ROWS), xs < W


@triton.jit
def _sat_step(tile, col, rs, ROWS: tl.constexpr):
    """One step of the walk down a plane: the summed-area rows of a ROWS x W tile given the
    column sums above it, and the column sums after it (the tile's last row, exactly)."""
    cols = col[None, :] + tl.cumsum(tile, axis=0)  # the running column sums at each row
    return tl.cumsum(cols, axis=1), tl.sum(tl.where(rs[:, None] == ROWS - 1, cols, 0.0), axis=0)


@triton.jit
def _sat_kernel(in_ptr, out_ptr, need_ptr, C, H, W, s_n, s_c, s_h, s_w, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
                ROWS: tl.constexpr):
    p, n, c, xs, rs, m = _plane_program(C, W, BLOCK_W, ROWS)
    src = in_ptr + n * s_n + c * s_c + xs[None, :] * s_w
    dst = out_ptr + p * H * W + xs[None, :]
    col = tl.zeros([BLOCK_W], ACC)
    # ROWS rows per step: ROWS loads in flight per column instead of one (the walk down the plane
    # is otherwise bound by the latency of one row's load per step)
    for y0 in range(0, H, ROWS):
        ys = y0 + rs
        mm = (ys < H)[:, None] & m[None, :]
        tile = tl.load(src + ys[:, None].to(tl.int64) * s_h, mask=mm, other=0.0).to(ACC)
        sat, col = _sat_step(tile, col, rs, ROWS)
        # only the rows some box query reads are written
        mm = mm & (tl.load(need_ptr + n * H + ys, mask=ys < H, other=0) != 0)[:, None]
        tl.store(dst + ys[:, None].to(tl.int64) * W, sat.to(out_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _box_extent(rng_ptr, bi_ptr, k, km, N, H, W):
    """Box k's image and inclusive range clipped to the HxW map, and whether it covers a pixel
    (the one clipping rule of the table's row marks and its queries)."""
    n = tl.load(bi_ptr + k, mask=km, other=-1)
    x0 = tl.maximum(tl.load(rng_ptr + 4 * k, mask=km, other=0), 0)
    y0 = tl.maximum(tl.load(rng_ptr + 4 * k + 1, mask=km, other=0), 0)
    x1 = tl.minimum(tl.load(rng_ptr + 4 * k + 2, mask=km, other=-1), W - 1)
    y1 = tl.minimum(tl.load(rng_ptr + 4 * k + 3, mask=km, other=-1), H - 1)
    return n, x0, y0, x1, y1, km & (n >= 0) & (n < N) & (x0 <= x1) & (y0 <= y1)


@triton.jit
def _mark_rows_kernel(rng_ptr, bi_ptr, need_ptr, K, N, H, W, BLOCK: tl.constexpr):
    # need[n*H + y] = 1 for the table rows _box_query_kernel reads: each box's last row and the
    # row above its first (every writer stores the same 1, so the result is order-free)
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n, x0, y0, x1, y1, ok = _box_extent(rng_ptr, bi_ptr, k, k < K, N, H, W)
    one = tl.full([BLOCK], 1, tl.uint8)
    tl.store(need_ptr + n * H + y1, one, mask=ok)
    tl.store(need_ptr + n * H + y0 - 1, one, mask=ok & (y0 > 0))


@triton.jit
def _box_query_kernel(sat_ptr, rng_ptr, bi_ptr, out_ptr, N, C, H, W, MEAN: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    n, x0, y0, x1, y1, ok = _box_extent(rng_ptr, bi_ptr, k, True, N, H, W)
    plane = sat_ptr + (n * C + cols.to(tl.int64)) * H * W
    m = cm & ok
    s = tl.load(plane + y1 * W + x1, mask=m, other=0.0)
    s -= tl.load(plane + (y0 - 1) * W + x1, mask=m & (y0 > 0), other=0.0)
    s -= tl.load(plane + y1 * W + (x0 - 1), mask=m & (x0 > 0), other=0.0)
    s += tl.load(plane + (y0 - 1) * W + (x0 - 1), mask=m & (y0 > 0) & (x0 > 0), other=0.0)
    if MEAN:
        cnt = tl.where(ok, (x1 - x0 + 1) * (y1 - y0 + 1), 1)
        s = s / cnt.to(s.dtype)
    tl.store(out_ptr + k * C + cols, s.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _paint_kernel(out_ptr, key_ptr, row_ptr, coef_ptr, start_ptr, val_ptr, s_k, s_c, C, H, W,
                  ACC: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
    # One program per (n,c) plane, as _sat_kernel, but the difference array is never stored:
    # each step builds its ROWS x W tile of it from the step's corner entries (sorted by key, so
    # a step's entries are one contiguous range, start_ptr[n*H + y]), then writes the painted
    # rows. Every pixel is written once (zeros outside the boxes), in the output's dtype.
    p, n, c, xs, rs, m = _plane_program(C, W, BLOCK_W, ROWS)
    dst = out_ptr + p * H * W + xs[None, :]
    col = tl.zeros([BLOCK_W], ACC)
    for y0 in range(0, H, ROWS):
        ys = y0 + rs
        first = tl.load(start_ptr + n * H + y0)
        last = tl.load(start_ptr + n * H + tl.minimum(y0 + ROWS, H))
        tile = tl.zeros([ROWS, BLOCK_W], ACC)
        base = (n * H + y0) * W
        for e in range(first, last):  # in key order: a fixed summation order
            rel = tl.load(key_ptr + e) - base
            v = tl.load(val_ptr + tl.load(row_ptr + e) * s_k + c * s_c).to(ACC) * tl.load(coef_ptr + e).to(ACC)
            hit = (rs[:, None] == rel // W) & (xs[None, :] == rel % W)
            tile += tl.where(hit, v, 0.0)
        painted, col = _sat_step(tile, col, rs, ROWS)
        tl.store(dst + ys[:, None].to(tl.int64) * W, painted.to(out_ptr.dtype.element_ty),
                 mask=(ys < H)[:, None] & m[None, :])


def _rows_per_step(W: int):
    block_w = triton.next_power_of_2(W)
    return block_w, max(1, min(8, 4096 // block_w))  # a step's tile stays at most 4096 values


def _sat(x, out, need):
    N, C, H, W = x.shape
    block_w, rows = _rows_per_step(W)
    _sat_kernel[(N * C,)](x, out, need, C, H, W, *x.stride(), ACC=tl_acc_dtype(x.dtype), BLOCK_W=block_w, ROWS=rows,
                          num_warps=4)


def box_pool_fwd(features, ranges, batch_index, mean: bool):
    """Same contract as the kdops::box_pool_fwd schema (csrc/ops.cpp): (L,K,C)."""
    return torch.stack([pool_level(f, r, batch_index, mean) for f, r in zip(features, ranges)])


def box_paint_fwd(values, ranges, batch_index, sizes, mean: bool):
    """Same contract as the kdops::box_paint_fwd schema (csrc/ops.cpp): L maps (N,C,H_l,W_l)."""
    return [paint_level(values[i // 3], ranges[i // 3], batch_index, *sizes[i:i + 3], mean)
            for i in range(0, len(sizes), 3)]


def pool_level(feature, ranges, batch_index, mean: bool):
    """One level: (K,C) from (N,C,H,W) and (K,4) ranges."""
    N, C, H, W = feature.shape
    K = ranges.shape[0]
    out = feature.new_zeros((K, C))
    if K == 0 or C == 0 or N * H * W == 0:
        return out
    acc = acc_dtype(feature)
    # rows of the table no box reads are never written; under the interpreter (the tests) the
    # table starts as NaN, so a query that read such a row would show
    if _INTERPRET:
        sat = torch.full((N, C, H, W), float("nan"), device=feature.device, dtype=acc)
    else:
        sat = torch.empty((N, C, H, W), device=feature.device, dtype=acc)
    BLOCK_C = min(128, triton.next_power_of_2(C))
    rng, bi = ranges.contiguous(), batch_index.contiguous()
    need = torch.zeros(N * H, dtype=torch.uint8, device=feature.device)
    with device_guard(feature):
        _mark_rows_kernel[(triton.cdiv(K, 256),)](rng, bi, need, K, N, H, W, BLOCK=256)
        _sat(feature, sat, need)
        _box_query_kernel[(K, triton.cdiv(C, BLOCK_C))](sat, rng, bi, out, N, C, H, W, MEAN=mean, BLOCK_C=BLOCK_C)
    return out


def corner_entries(ranges, batch_index, N, H, W, mean: bool, dtype):
    """The 4 signed corners of each box's difference array: (rows, coef, keys); -1 keys drop."""
    K = ranges.shape[0]
    x0 = ranges[:, 0].clamp(min=0)
    y0 = ranges[:, 1].clamp(min=0)
    x1 = ranges[:, 2].clamp(max=W - 1)
    y1 = ranges[:, 3].clamp(max=H - 1)
    ok = (batch_index >= 0) & (batch_index < N) & (x0 <= x1) & (y0 <= y1)
    ys = torch.stack([y0, y0, y1 + 1, y1 + 1], 1)
    xs = torch.stack([x0, x1 + 1, x0, x1 + 1], 1)
    keep = ok[:, None] & (ys < H) & (xs < W)
    keys = torch.where(keep, (batch_index[:, None] * H + ys) * W + xs, -1).reshape(-1)
    sign = constant([1.0, -1.0, -1.0, 1.0], like=ranges, dtype=dtype)
    coef = sign.expand(K, 4)
    if mean:
        cnt = ((x1 - x0 + 1) * (y1 - y0 + 1)).clamp(min=1).to(dtype)
        coef = coef / cnt[:, None]
    rows = torch.arange(K, device=ranges.device)[:, None].expand(K, 4).reshape(-1)
    return rows, coef.reshape(-1).contiguous(), keys


def paint_level(values, ranges, batch_index, N, H, W, mean: bool):
    """One level: (N,C,H,W) from (K,C) values (any strides) and (K,4) ranges."""
    N, H, W = int(N), int(H), int(W)
    K, C = values.shape
    out = torch.empty((N, C, H, W), device=values.device, dtype=values.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    acc = acc_dtype(values)
    rows, coef, keys = corner_entries(ranges, batch_index, N, H, W, mean, acc)
    keys, order = torch.sort(keys, stable=True)  # dropped entries (-1) first, never in a step's range
    # step ranges: the first entry of each (image, row), and the end
    starts = torch.searchsorted(keys, torch.arange(N * H + 1, device=keys.device) * W)
    block_w, steps = _rows_per_step(W)
    with device_guard(values):
        _paint_kernel[(N * C,)](out, keys, rows[order].contiguous(), coef[order].contiguous(), starts, values,
                                values.stride(0), values.stride(1), C, H, W, ACC=tl_acc_dtype(values.dtype),
                                BLOCK_W=block_w, ROWS=steps, num_warps=4)
    return out
