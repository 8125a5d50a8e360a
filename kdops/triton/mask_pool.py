"""Triton kernels of kdops::mask_pool_fwd and kdops::mask_pool_bwd (the CUDA backend).

The objects are put in per-image segments once on the device (a stable ``torch.sort`` of
the batch index, objects with an index outside [0,N) last, and ``searchsorted`` for the
segment bounds: no host sync), then every kernel is a tiled matrix product over one
image's segment with ``tl.dot`` (float32 accumulation; float64 stays float64):

- forward, one program per (tile of <= BLOCK_K objects of one image, channel block):
  out[k, c] = sum over pixel blocks of M[k, hw] F[n, c, hw];
- grad_feature, one program per (pixel block, channel block, image), looping over the
  image's objects in a fixed order: grad_F[n, c, hw] = sum_k g[k, c] M[k, hw];
- grad_masks, one program per (object tile, pixel block), looping over channel blocks:
  grad_M[k, hw] = sum_c g[k, c] F[n, c, hw].

Every output element is written by one program with a fixed summation order: no atomics,
bitwise reproducible. The tile table has a static upper bound of min(K, cdiv(K, BLOCK_K) + N)
entries (empty tiles exit at once), so launch grids never depend on the data. Objects whose
batch index is out of range stay 0 in ``out`` and ``grad_masks`` and are never read.
Feature maps are read through their strides (channels_last works without a copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, device_guard, tl_acc_dtype


@triton.jit
def _mm_acc(acc, a, b, DOT: tl.constexpr):
    """acc + a @ b. DOT = 1: tl.dot on the inputs' type (fp32 accumulation); 2: on fp32
    copies (the interpreter multiplies bfloat16's raw uint16 bits in its tl.dot); 0: a
    broadcast product, for float64 (tl.dot's fp64 support varies across Triton versions
    and GPUs; float64 is for gradcheck, not speed)."""
    if DOT == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc += tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
    return acc


@triton.jit
def _tile_objects(order_ptr, tile_ptr, BLOCK_K: tl.constexpr):
    """This program's tile (image n, objects order[lo:hi]): the row mask and the object indices
    (masked loads only: an empty tile reads nothing)."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.load(tile_ptr + 3 * t)
    lo = tl.load(tile_ptr + 3 * t + 1)
    hi = tl.load(tile_ptr + 3 * t + 2)
    i = lo + tl.arange(0, BLOCK_K)
    im = i < hi
    k = tl.load(order_ptr + i, mask=im, other=0)
    return n, lo, hi, im, k


@triton.jit
def _pool_kernel(f_ptr, m_ptr, order_ptr, tile_ptr, out_ptr, C, HW, W, s_n, s_c, s_h, s_w, m_k, m_h, m_w,
                 ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_HW: tl.constexpr):
    n, lo, hi, im, k = _tile_objects(order_ptr, tile_ptr, BLOCK_K)
    if lo < hi:
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cols < C
        f_img = f_ptr + n * s_n + cols.to(tl.int64) * s_c
        acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
        for s in range(0, HW, BLOCK_HW):
            hw = s + tl.arange(0, BLOCK_HW)
            hm = hw < HW
            y = hw // W
            x = hw - y * W
            m = tl.load(m_ptr + k[:, None] * m_k + (y * m_h + x * m_w)[None, :], mask=im[:, None] & hm[None, :],
                        other=0.0)
            f = tl.load(f_img[None, :] + (y * s_h + x * s_w)[:, None], mask=hm[:, None] & cm[None, :], other=0.0)
            acc = _mm_acc(acc, m, f, DOT)
        tl.store(out_ptr + k[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=im[:, None] & cm[None, :])


@triton.jit
def _grad_feature_kernel(g_ptr, m_ptr, order_ptr, bounds_ptr, gf_ptr, C, HW, W, m_k, m_h, m_w,
                         ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_HW: tl.constexpr):
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    hm = hw < HW
    cm = cols < C
    y = hw // W
    x = hw - y * W
    m_off = (y * m_h + x * m_w)[None, :]
    lo = tl.load(bounds_ptr + n)
    hi = tl.load(bounds_ptr + n + 1)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for i0 in range(lo, hi, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        im = i < hi
        k = tl.load(order_ptr + i, mask=im, other=0)
        g = tl.load(g_ptr + k[None, :] * C + cols[:, None], mask=cm[:, None] & im[None, :], other=0.0)
        m = tl.load(m_ptr + k[:, None] * m_k + m_off, mask=im[:, None] & hm[None, :], other=0.0)
        acc = _mm_acc(acc, g.to(m.dtype), m, DOT)
    dst = gf_ptr + n * C * HW + cols[:, None].to(tl.int64) * HW + hw[None, :]
    tl.store(dst, acc.to(gf_ptr.dtype.element_ty), mask=cm[:, None] & hm[None, :])


@triton.jit
def _grad_masks_kernel(g_ptr, f_ptr, order_ptr, tile_ptr, gm_ptr, C, HW, W, s_n, s_c, s_h, s_w,
                       ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_HW: tl.constexpr):
    n, lo, hi, im, k = _tile_objects(order_ptr, tile_ptr, BLOCK_K)
    if lo < hi:
        hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hm = hw < HW
        y = hw // W
        x = hw - y * W
        f_img = f_ptr + n * s_n + (y * s_h + x * s_w)[None, :]
        acc = tl.zeros([BLOCK_K, BLOCK_HW], ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cm = cols < C
            g = tl.load(g_ptr + k[:, None] * C + cols[None, :], mask=im[:, None] & cm[None, :], other=0.0)
            f = tl.load(f_img + cols[:, None].to(tl.int64) * s_c, mask=cm[:, None] & hm[None, :], other=0.0)
            acc = _mm_acc(acc, g.to(f.dtype), f, DOT)
        tl.store(gm_ptr + k[:, None] * HW + hw[None, :], acc.to(gm_ptr.dtype.element_ty),
                 mask=im[:, None] & hm[None, :])


def _dot_mode(dtype) -> int:
    if dtype == torch.float64:
        return 0
    return 2 if INTERPRET and dtype == torch.bfloat16 else 1


def _blocks(dtype, K: int, C: int, HW: int):
    """(BLOCK_K, BLOCK_C, BLOCK_HW): tensor-core tiles on the GPU, small ones for the fp64
    broadcast product, and few large programs under the interpreter (~5 ms per program)."""
    p2 = triton.next_power_of_2
    if INTERPRET:
        return max(16, min(64, p2(K))), max(16, min(128, p2(C))), max(16, min(1024, p2(HW)))
    if dtype == torch.float64:
        return 16, 16, 16
    return 32, 64, 64


def image_segments(batch_index, N: int, block_k: int):
    """Objects ordered by image on the device, without a host sync.

    Returns (order (K,), bounds (N+1,) with image n's objects at order[bounds[n]:bounds[n+1]],
    tiles (T,3) rows [n, lo, hi] covering every segment in runs of <= block_k; spare rows are
    empty). Objects with an out-of-range image sort last, outside every segment."""
    K = batch_index.numel()
    dev = batch_index.device
    key = torch.where((batch_index >= 0) & (batch_index < N), batch_index, N)
    skey, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(skey, torch.arange(N + 1, device=dev))
    count = bounds[1:] - bounds[:-1]
    ntiles = (count + block_k - 1) // block_k
    tile_end = torch.cumsum(ntiles, 0)
    T = min(K, triton.cdiv(K, block_k) + N)  # sum_n cdiv(count_n, B) <= cdiv(K, B) + N, and <= K
    p = torch.arange(T, device=dev)
    tn = torch.searchsorted(tile_end, p, right=True)  # N for the spare tiles
    nc = tn.clamp(max=N - 1)
    lo = bounds[nc] + (p - (tile_end[nc] - ntiles[nc])) * block_k
    hi = torch.minimum(lo + block_k, bounds[nc + 1])
    live = tn < N
    tiles = torch.stack([nc, torch.where(live, lo, 0), torch.where(live, hi, 0)], 1).contiguous()
    return order.contiguous(), bounds.contiguous(), tiles


def _check(feature, masks):
    if masks.dtype != feature.dtype:
        raise RuntimeError(f"kdops::mask_pool: masks must have the feature's dtype {feature.dtype}, got {masks.dtype}")


def mask_pool_fwd(feature, masks, batch_index):
    """Same contract as the kdops::mask_pool_fwd schema (csrc/ops.cpp)."""
    _check(feature, masks)
    N, C, H, W = feature.shape
    K = masks.shape[0]
    out = feature.new_zeros((K, C))
    if K == 0 or C == 0 or N * H * W == 0:
        return out
    BK, BC, BHW = _blocks(feature.dtype, K, C, H * W)
    order, _, tiles = image_segments(batch_index, N, BK)
    with device_guard(feature):
        _pool_kernel[(tiles.shape[0], triton.cdiv(C, BC))](
            feature, masks, order, tiles, out, C, H * W, W, *feature.stride(), *masks.stride(),
            ACC=tl_acc_dtype(feature.dtype), DOT=_dot_mode(feature.dtype), BLOCK_K=BK, BLOCK_C=BC,
            BLOCK_HW=BHW, num_warps=4)
    return out


def mask_pool_bwd(grad, feature, masks, batch_index, grad_feature: bool, grad_masks: bool):
    """Same contract as the kdops::mask_pool_bwd schema (csrc/ops.cpp)."""
    _check(feature, masks)
    N, C, H, W = feature.shape
    K, HW = masks.shape[0], H * W
    empty = K == 0 or C == 0 or N * HW == 0
    # every (n, c, hw) of grad_F is written by one program; grad_M rows of objects without an image stay 0
    gf = (feature.new_zeros if empty else feature.new_empty)((N, C, H, W)) if grad_feature else feature.new_empty((0,))
    gm = masks.new_zeros((K, H, W)) if grad_masks else masks.new_empty((0,))
    if empty or not (grad_feature or grad_masks):
        return gf, gm
    BK, BC, BHW = _blocks(feature.dtype, K, C, HW)
    order, bounds, tiles = image_segments(batch_index, N, BK)
    g = grad.contiguous()
    acc, dot = tl_acc_dtype(feature.dtype), _dot_mode(feature.dtype)
    with device_guard(feature):
        if grad_feature:
            _grad_feature_kernel[(triton.cdiv(HW, BHW), triton.cdiv(C, BC), N)](
                g, masks, order, bounds, gf, C, HW, W, *masks.stride(),
                ACC=acc, DOT=dot, BLOCK_K=BK, BLOCK_C=BC, BLOCK_HW=BHW, num_warps=4)
        if grad_masks:
            _grad_masks_kernel[(tiles.shape[0], triton.cdiv(HW, BHW))](
                g, feature, order, tiles, gm, C, HW, W, *feature.stride(),
                ACC=acc, DOT=dot, BLOCK_K=BK, BLOCK_C=BC, BLOCK_HW=BHW, num_warps=4)
    return gf, gm
