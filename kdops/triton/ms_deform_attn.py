"""Triton kernels of kdops::ms_deform_attn_{fwd,bwd} (one CUDA backend; see kdops/ops/ms_deform_attn.py).

Each program owns one (n, q, m) triple and works on an [L*P, D] tile: the L*P samples'
geometry is loaded as vectors, each of the four bilinear corners is gathered as an [L*P, D]
tile of value rows (bounds-masked, so no read leaves `value` whatever spatial_shapes say) and
reduced over the samples. Offsets are int64.

Backward: the same tile gives the location and weight gradients. The value gradient is either
scattered with fp32 atomics into an fp32 buffer (cast at the end; no fp16 atomics), or, when
deterministic, gathered: samples are sorted (stably) by the top-left corner they touch, and one
program per value row (n, s, m) binary-searches the four neighbouring segments and sums their
contributions in sorted order: no atomics, bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard, tl_acc_dtype
from .._dtype import acc_dtype

_SENTINEL = 1 << 62


@triton.jit
def _geometry(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, L, P, BLOCK_LP: tl.constexpr, ACC: tl.constexpr):
    lp = tl.arange(0, BLOCK_LP)
    lpm = lp < L * P
    lvl = lp // P
    H = tl.load(shapes_ptr + 2 * lvl, mask=lpm, other=0)
    W = tl.load(shapes_ptr + 2 * lvl + 1, mask=lpm, other=0)
    start = tl.load(starts_ptr + lvl, mask=lpm, other=0)
    base = pid * L * P + lp
    x = tl.load(loc_ptr + 2 * base, mask=lpm, other=0.0).to(ACC)
    y = tl.load(loc_ptr + 2 * base + 1, mask=lpm, other=0.0).to(ACC)
    a = tl.load(attn_ptr + base, mask=lpm, other=0.0).to(ACC)
    h_im = y * H.to(ACC) - 0.5
    w_im = x * W.to(ACC) - 0.5
    inside = lpm & (h_im > -1.0) & (w_im > -1.0) & (h_im < H.to(ACC)) & (w_im < W.to(ACC))
    h_im = tl.where(inside, h_im, 0.0)
    w_im = tl.where(inside, w_im, 0.0)
    hf = tl.floor(h_im)
    wf = tl.floor(w_im)
    return lpm, H, W, start, a, inside, hf.to(tl.int64), wf.to(tl.int64), h_im - hf, w_im - wf


@triton.jit
def _corner(inside, H, W, start, S, h, w):
    ok = inside & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    row = start + h * W + w
    ok = ok & (row >= 0) & (row < S)
    return ok, tl.where(ok, row, 0)


@triton.jit
def _fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, S, M, D, Q, L, P,
                BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    n = pid // (Q * M)
    lpm, H, W, start, a, inside, h0, w0, lh, lw = _geometry(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, L, P,
                                                            BLOCK_LP, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros([BLOCK_D], ACC)
    for c in tl.static_range(4):
        dh = c // 2
        dw = c % 2
        ok, row = _corner(inside, H, W, start, S, h0 + dh, w0 + dw)
        wgt = a * (lh if dh == 1 else 1.0 - lh) * (lw if dw == 1 else 1.0 - lw)
        ptrs = value_ptr + ((n * S + row) * M + m)[:, None] * D + d[None, :]
        v = tl.load(ptrs, mask=ok[:, None] & dm[None, :], other=0.0).to(ACC)
        acc += tl.sum(v * wgt[:, None], axis=0)
    tl.store(out_ptr + pid * D + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _bwd_kernel(go_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, gv_ptr, gloc_ptr, gattn_ptr,
                S, M, D, Q, L, P, GRAD_VALUE: tl.constexpr, GRAD_SAMPLING: tl.constexpr,
                BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    n = pid // (Q * M)
    lpm, H, W, start, a, inside, h0, w0, lh, lw = _geometry(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, L, P,
                                                            BLOCK_LP, ACC)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    go = tl.load(go_ptr + pid * D + d, mask=dm, other=0.0).to(ACC)
    val = tl.zeros([BLOCK_LP], ACC)
    gh = tl.zeros([BLOCK_LP], ACC)
    gw = tl.zeros([BLOCK_LP], ACC)
    for c in tl.static_range(4):
        dh = c // 2
        dw = c % 2
        ok, row = _corner(inside, H, W, start, S, h0 + dh, w0 + dw)
        fh = lh if dh == 1 else 1.0 - lh
        fw = lw if dw == 1 else 1.0 - lw
        offs = ((n * S + row) * M + m)[:, None] * D + d[None, :]
        mask = ok[:, None] & dm[None, :]
        if GRAD_SAMPLING:
            v = tl.load(value_ptr + offs, mask=mask, other=0.0).to(ACC)
            dot = tl.sum(v * go[None, :], axis=1)
            val += fh * fw * dot
            gh += (1.0 if dh == 1 else -1.0) * fw * dot
            gw += (1.0 if dw == 1 else -1.0) * fh * dot
        if GRAD_VALUE:
            tl.atomic_add(gv_ptr + offs, (a * fh * fw)[:, None] * go[None, :], mask=mask)
    if GRAD_SAMPLING:
        base = pid * L * P + tl.arange(0, BLOCK_LP)
        tl.store(gattn_ptr + base, val.to(gattn_ptr.dtype.element_ty), mask=lpm)
        tl.store(gloc_ptr + 2 * base, (a * gw * W.to(ACC)).to(gloc_ptr.dtype.element_ty), mask=lpm)
        tl.store(gloc_ptr + 2 * base + 1, (a * gh * H.to(ACC)).to(gloc_ptr.dtype.element_ty), mask=lpm)


@triton.jit
def _keys_kernel(shapes_ptr, starts_ptr, pad_ptr, loc_ptr, attn_ptr, key_ptr, M, Q, L, P, SPAD,
                 BLOCK_LP: tl.constexpr, ACC: tl.constexpr):
    # key of a sample = its (n, m) plane and its top-left corner in a per-level grid padded by
    # one row and column, so corners at -1 still have a slot; samples outside sort last.
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    n = pid // (Q * M)
    lpm, H, W, start, a, inside, h0, w0, lh, lw = _geometry(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, L, P,
                                                            BLOCK_LP, ACC)
    lp = tl.arange(0, BLOCK_LP)
    pad = tl.load(pad_ptr + lp // P, mask=lpm, other=0)
    key = (n * M + m) * SPAD + pad + (h0 + 1) * (W + 1) + (w0 + 1)
    tl.store(key_ptr + pid * L * P + lp, tl.where(inside, key, 1 << 62), mask=lpm)


@triton.jit
def _lower_bound(keys_ptr, n_keys, target, STEPS: tl.constexpr):
    lo = target * 0  # int64 scalars (target is an int64 key)
    hi = lo + n_keys
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(keys_ptr + tl.minimum(mid, n_keys - 1)) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _gather_value_grad_kernel(go_ptr, shapes_ptr, starts_ptr, pad_ptr, loc_ptr, attn_ptr, skey_ptr, perm_ptr,
                              gv_ptr, n_keys, S, M, D, Q, L, P, SPAD, STEPS: tl.constexpr,
                              BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one value row (n, s, m)
    m = pid % M
    s = (pid // M) % S
    n = pid // (M * S)
    # level of row s: the last level whose start is <= s (L is small)
    lvl = s * 0
    for j in range(1, L):
        lvl = tl.where(tl.load(starts_ptr + j) <= s, j, lvl)
    H = tl.load(shapes_ptr + 2 * lvl)
    W = tl.load(shapes_ptr + 2 * lvl + 1)
    r = s - tl.load(starts_ptr + lvl)
    h = r // tl.maximum(W, 1)
    w = r - h * W
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros([BLOCK_D], ACC)
    plane = (n * M + m) * SPAD + tl.load(pad_ptr + lvl)
    for c in tl.static_range(4):
        dh = c // 2
        dw = c % 2
        key = plane + (h - dh + 1) * (W + 1) + (w - dw + 1)
        lo = _lower_bound(skey_ptr, n_keys, key, STEPS)
        hi = _lower_bound(skey_ptr, n_keys, key + 1, STEPS)
        for i in range(lo, hi):
            smp = tl.load(perm_ptr + i)  # flat (n, q, m, l, p) index of the sample
            nqm = smp // (L * P)
            x = tl.load(loc_ptr + 2 * smp).to(ACC)
            y = tl.load(loc_ptr + 2 * smp + 1).to(ACC)
            a = tl.load(attn_ptr + smp).to(ACC)
            h_im = y * H.to(ACC) - 0.5
            w_im = x * W.to(ACC) - 0.5
            lh = h_im - tl.floor(h_im)
            lw = w_im - tl.floor(w_im)
            wgt = a * (lh if dh == 1 else 1.0 - lh) * (lw if dw == 1 else 1.0 - lw)
            g = tl.load(go_ptr + nqm * D + d, mask=dm, other=0.0).to(ACC)
            acc += wgt * g
    ok = (r >= 0) & (r < H * W)
    tl.store(gv_ptr + pid * D + d, tl.where(ok, acc, 0.0).to(gv_ptr.dtype.element_ty), mask=dm)


def _blocks(D, L, P):
    return triton.next_power_of_2(max(L * P, 1)), triton.next_power_of_2(max(D, 1))


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Same contract as the kdops::ms_deform_attn_fwd schema (csrc/ops.cpp)."""
    v, loc, attn = value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()
    N, S, M, D = v.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = v.new_empty((N, Q, M * D))
    if out.numel() == 0:
        return out
    if L * P == 0:
        return out.zero_()
    BLOCK_LP, BLOCK_D = _blocks(D, L, P)
    with device_guard(v):
        _fwd_kernel[(N * Q * M,)](v, spatial_shapes.contiguous(), level_start_index.contiguous(), loc, attn, out,
                                  S, M, D, Q, L, P, BLOCK_LP=BLOCK_LP, BLOCK_D=BLOCK_D, ACC=tl_acc_dtype(v.dtype),
                                  num_warps=4)
    return out


def ms_deform_attn_bwd(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, grad_value: bool, grad_sampling: bool, deterministic: bool):
    """Same contract as the kdops::ms_deform_attn_bwd schema (csrc/ops.cpp)."""
    v, loc, attn = value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()
    go = grad_output.contiguous()
    shapes, starts = spatial_shapes.contiguous(), level_start_index.contiguous()
    N, S, M, D = v.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    acc = acc_dtype(v)
    empty = v.new_empty((0,))
    gloc = torch.zeros_like(loc) if grad_sampling else empty
    gattn = torch.zeros_like(attn) if grad_sampling else empty
    atomic = grad_value and not deterministic
    gv_acc = torch.zeros(v.shape, device=v.device, dtype=acc) if atomic else empty
    BLOCK_LP, BLOCK_D = _blocks(D, L, P)
    ACC = tl_acc_dtype(v.dtype)
    programs = N * Q * M * (1 if L * P else 0)
    with device_guard(v):
        if programs and (atomic or grad_sampling):
            _bwd_kernel[(programs,)](go, v, shapes, starts, loc, attn, gv_acc if atomic else v, gloc, gattn,
                                     S, M, D, Q, L, P, GRAD_VALUE=atomic, GRAD_SAMPLING=grad_sampling,
                                     BLOCK_LP=BLOCK_LP, BLOCK_D=BLOCK_D, ACC=ACC, num_warps=4)
        if grad_value and deterministic:
            gv = _value_grad_sorted(go, v, shapes, starts, loc, attn, BLOCK_LP, BLOCK_D, ACC)
        elif grad_value:
            gv = gv_acc.to(v.dtype)
        else:
            gv = empty
    return gv, gloc, gattn


def _value_grad_sorted(go, v, shapes, starts, loc, attn, BLOCK_LP, BLOCK_D, ACC):
    N, S, M, D = v.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    gv = torch.empty_like(v)
    if gv.numel() == 0:
        return gv
    n_keys = N * Q * M * L * P
    HW = shapes[:, 0] * shapes[:, 1]
    padded = torch.where(HW > 0, (shapes[:, 0] + 1) * (shapes[:, 1] + 1), 0)
    pad = torch.cumsum(padded, 0) - padded  # padded start of each level (on the device, no sync)
    # Size of one (n, m) plane of keys, known on the host without reading spatial_shapes:
    # (H+1)(W+1) <= 2HW + 2 for H, W >= 1 (empty levels get no slot), so the sum is <= 2S + 2L.
    SPAD = 2 * S + 2 * L + 1
    keys = torch.full((max(n_keys, 1),), _SENTINEL, device=v.device, dtype=torch.int64)
    if n_keys:
        _keys_kernel[(N * Q * M,)](shapes, starts, pad, loc, attn, keys, M, Q, L, P, SPAD,
                                   BLOCK_LP=BLOCK_LP, ACC=ACC, num_warps=4)
    skeys, perm = torch.sort(keys[:n_keys] if n_keys else keys[:0], stable=True)
    steps = max(1, int(n_keys).bit_length() + 1)
    _gather_value_grad_kernel[(N * S * M,)](go, shapes, starts, pad, loc, attn, skeys if n_keys else keys,
                                            perm if n_keys else keys, gv, n_keys, S, M, D, Q, L, P, SPAD,
                                            STEPS=steps, BLOCK_D=BLOCK_D, ACC=ACC, num_warps=4)
    return gv
