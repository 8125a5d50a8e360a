"""Triton kernel of kdops::bckd_cls_loss_fwd (the CUDA backend of kdops.bckd_cls_loss).

Inputs are strided (N,H,W,J,C) views (see kdops/triton/_dense_head.py): one program
owns BLOCK_A consecutive anchors (order n,h,w,j), walks the classes in BLOCK_K chunks
and writes its partial loss; torch sums the partials (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, device_guard, grid_block, tl_acc_dtype
from ._dense_head import anchor_offsets, mem_strides5
from .._dtype import acc_dtype


@triton.jit
def _log1p_unit(e):
    # log(1 + e), 0 <= e <= 1, as 2 atanh(e / (2 + e)): accurate for tiny e (no log1p in tl)
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def _cls_kernel(s_ptr, t_ptr, w_ptr, g_ptr, gw_ptr, part_ptr, A, K, H, W, J,
                ssN, ssH, ssW, ssJ, ssC, tsN, tsH, tsW, tsJ, tsC, gsN, gsH, gsW, gsJ, gsC, beta, scale,
                MODE: tl.constexpr, HAS_W: tl.constexpr, WRITE_G: tl.constexpr, WRITE_GW: tl.constexpr,
                ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    a = pid.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    am = a < A
    so = anchor_offsets(a, H, W, J, ssN, ssH, ssW, ssJ)
    to = anchor_offsets(a, H, W, J, tsN, tsH, tsW, tsJ)
    go = anchor_offsets(a, H, W, J, gsN, gsH, gsW, gsJ)
    wa = tl.full([BLOCK_A], 1.0, ACC)
    if HAS_W:
        wa = tl.load(w_ptr + a, mask=am, other=0.0).to(ACC)
    row = tl.zeros([BLOCK_A], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = am[:, None] & (k < K)[None, :]
        x = tl.load(s_ptr + so[:, None] + k[None, :] * ssC, mask=m, other=0.0).to(ACC)
        t = tl.load(t_ptr + to[:, None] + k[None, :] * tsC, mask=m, other=0.0).to(ACC)
        ex = tl.exp(-tl.abs(x))
        et = tl.exp(-tl.abs(t))
        q = tl.where(x >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex))
        p = tl.where(t >= 0, 1.0 / (1.0 + et), et / (1.0 + et))
        bce = (1.0 - p) * x + tl.maximum(-x, 0.0) + _log1p_unit(ex)
        d = p - q
        ad = tl.abs(d)
        sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        qq = q * (1.0 - q)
        if MODE == 1:
            gap = ad
            dg = -sgn * qq
        elif MODE == 2:
            gap = d * d
            dg = -2.0 * d * qq
        else:
            # the smallest normal fp32: a Python float below it (1e-38) is typed fp64 by the
            # compiler (not by the interpreter) and turned the loop's fp32 carry into fp64
            lad = tl.log(tl.maximum(ad, 1.1754943508222875e-38))
            gap = tl.where(ad > 0, tl.exp(beta * lad), 0.0)
            dg = tl.where(ad > 0, -beta * tl.exp((beta - 1.0) * lad) * sgn * qq, 0.0)
        f = tl.where(m, bce * gap, 0.0)
        row += tl.sum(f, axis=1)
        if WRITE_G:
            grad = ((q - p) * gap + bce * dg) * (scale * wa)[:, None]
            tl.store(g_ptr + go[:, None] + k[None, :] * gsC, grad.to(g_ptr.dtype.element_ty), mask=m)
    if WRITE_GW:
        tl.store(gw_ptr + a, scale * row, mask=am)
    tl.store(part_ptr + pid, tl.sum(row * wa, axis=0))


def bckd_cls_loss_fwd(student, teacher, weight, beta: float, scale: float, grad_student: bool, grad_weight: bool):
    """Same contract as the kdops::bckd_cls_loss_fwd schema (csrc/ops.cpp)."""
    N, H, W, J, K = student.shape
    A = N * H * W * J
    acc = acc_dtype(student)
    grad = torch.empty_like(student) if grad_student else student.new_empty((0,))
    w = weight.contiguous() if weight is not None else None
    gw = student.new_empty((A,), dtype=acc) if (grad_weight and w is not None) else student.new_empty((0,), dtype=acc)
    if A == 0 or K == 0:
        if gw.numel():
            gw.zero_()
        if grad.numel():
            grad.zero_()
        return student.new_zeros((), dtype=acc), grad, gw
    BLOCK_A = 64 if INTERPRET else 32
    BLOCK_K = 128 if INTERPRET else 32
    nprog = grid_block(A, BLOCK_A)
    part = torch.empty(nprog, device=student.device, dtype=acc)
    mode = 1 if beta == 1.0 else (2 if beta == 2.0 else 0)
    g_str = mem_strides5(grad) if grad_student else mem_strides5(student)
    with device_guard(student):
        _cls_kernel[(nprog,)](
            student, teacher, w if w is not None else part, grad if grad_student else student,
            gw if gw.numel() else part, part, A, K, H, W, J,
            *mem_strides5(student), *mem_strides5(teacher), *g_str, float(beta), float(scale),
            MODE=mode, HAS_W=w is not None, WRITE_G=grad_student, WRITE_GW=gw.numel() > 0,
            ACC=tl_acc_dtype(student.dtype), BLOCK_A=BLOCK_A, BLOCK_K=BLOCK_K, num_warps=4)
    return part.sum() * scale, grad, gw


