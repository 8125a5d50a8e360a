"""Triton kernels of kdops::masked_mse_fwd (the CUDA backend).

One program per BLOCK elements of the flattened (N,C,H,W) tensor reads student and
teacher once, gathers its pixel and channel weights (small, cache resident) and writes
one partial loss (summed by torch: deterministic); in backward the same kernel writes
the gradient 2*scale*g*w*(s-t), g = grad_output read on the device (no host sync).
The weight gradients, needed only when a weight requires grad, come from a second
kernel that walks the channels of a pixel run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size, device_guard, grid_block, tl_acc_dtype
from .._dtype import acc_dtype


@triton.jit
def _masked_mse_kernel(s_ptr, t_ptr, pw_ptr, cw_ptr, g_ptr, gl_ptr, part_ptr, numel, C, HW, gscale,
                           HAS_PW: tl.constexpr, HAS_CW: tl.constexpr, WRITE_GRAD: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=m, other=0.0).to(ACC)
    d = s - t
    nc = offs // HW
    w = tl.full([BLOCK], 1.0, ACC)
    if HAS_PW:
        hw = offs - nc * HW
        w = tl.load(pw_ptr + (nc // C) * HW + hw, mask=m, other=0.0).to(ACC)
    if HAS_CW:
        w = w * tl.load(cw_ptr + nc, mask=m, other=0.0).to(ACC)
    wd = w * d
    tl.store(part_ptr + pid, tl.sum(wd * d, axis=0))
    if WRITE_GRAD:
        gs = gscale * tl.load(gl_ptr).to(ACC)
        tl.store(g_ptr + offs, (gs * wd).to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masked_mse_wgrad_kernel(s_ptr, t_ptr, pw_ptr, cw_ptr, gl_ptr, gpw_ptr, gcw_part_ptr, C, HW, nblk, scale,
                             HAS_PW: tl.constexpr, HAS_CW: tl.constexpr, ACC: tl.constexpr,
                             BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    hw = k * BLOCK + tl.arange(0, BLOCK)
    m = hw < HW
    pw = tl.full([BLOCK], 1.0, ACC)
    if HAS_PW:
        pw = tl.load(pw_ptr + n * HW + hw, mask=m, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for c in range(0, C):
        off = (n * C + c) * HW + hw
        d = tl.load(s_ptr + off, mask=m, other=0.0).to(ACC) - tl.load(t_ptr + off, mask=m, other=0.0).to(ACC)
        dd = d * d
        if HAS_CW:
            acc += tl.load(cw_ptr + n * C + c).to(ACC) * dd
        else:
            acc += dd
        tl.store(gcw_part_ptr + (n * C + c) * nblk + k, tl.sum(pw * dd, axis=0))
    if HAS_PW:
        tl.store(gpw_ptr + n * HW + hw, scale * tl.load(gl_ptr).to(ACC) * acc, mask=m)


def _launch(s, t, pw, cw, scale, grad_loss, grad, part):
    N, C, H, W = s.shape
    dummy = part  # never read when the matching HAS_* flag is off
    BLOCK = block_size(1024)
    _masked_mse_kernel[(part.numel(),)](
        s, t, pw if pw is not None else dummy, cw if cw is not None else dummy,
        grad if grad is not None else s, grad_loss if grad_loss is not None else dummy, part,
        s.numel(), C, H * W, 2.0 * scale,
        HAS_PW=pw is not None, HAS_CW=cw is not None, WRITE_GRAD=grad is not None,
        ACC=tl_acc_dtype(s.dtype), BLOCK=BLOCK, num_warps=4)


def masked_mse_fwd(student, teacher, pixel_weight, channel_weight, scale: float):
    """Same contract as the kdops::masked_mse_fwd schema (csrc/ops.cpp)."""
    s, t = student.contiguous(), teacher.contiguous()
    if s.numel() == 0:
        return s.new_zeros((), dtype=acc_dtype(s))
    pw = pixel_weight.contiguous() if pixel_weight is not None else None
    cw = channel_weight.contiguous() if channel_weight is not None else None
    part = torch.empty(grid_block(s.numel(), block_size(1024)), device=s.device, dtype=acc_dtype(s))
    with device_guard(s):
        _launch(s, t, pw, cw, scale, None, None, part)
    return part.sum() * scale


def masked_mse_fwd_grad(student, teacher, pixel_weight, channel_weight, scale: float):
    """Same contract as the kdops::masked_mse_fwd_grad schema (csrc/ops.cpp): the loss and the student's
    gradient of it from one launch (kdops/ops calls it on the CPU only; here for a complete op)."""
    s, t = student.contiguous(), teacher.contiguous()
    grad = torch.empty_like(s)
    if s.numel() == 0:
        return s.new_zeros((), dtype=acc_dtype(s)), grad
    pw = pixel_weight.contiguous() if pixel_weight is not None else None
    cw = channel_weight.contiguous() if channel_weight is not None else None
    part = torch.empty(grid_block(s.numel(), block_size(1024)), device=s.device, dtype=acc_dtype(s))
    with device_guard(s):
        _launch(s, t, pw, cw, scale, torch.ones(1, device=s.device, dtype=acc_dtype(s)), grad, part)
    return part.sum() * scale, grad


def masked_mse_bwd(grad_loss, student, teacher, pixel_weight, channel_weight, scale: float, grad_input: bool,
                   grad_weights: bool):
    """Same contract as the kdops::masked_mse_bwd schema (csrc/ops.cpp)."""
    s, t = student.contiguous(), teacher.contiguous()
    N, C, H, W = s.shape
    HW, acc = H * W, acc_dtype(s)
    pw = pixel_weight.contiguous() if pixel_weight is not None else None
    cw = channel_weight.contiguous() if channel_weight is not None else None
    gl = grad_loss.reshape(1).to(acc)
    grad = torch.empty_like(s) if grad_input else s.new_empty((0,))
    gpw = torch.zeros_like(pw) if (grad_weights and pw is not None) else s.new_empty((0,), dtype=acc)
    gcw = torch.zeros_like(cw) if (grad_weights and cw is not None) else s.new_empty((0,), dtype=acc)
    if s.numel() == 0:
        return grad, gpw, gcw
    with device_guard(s):
        if grad_input:
            part = torch.empty(grid_block(s.numel(), block_size(1024)), device=s.device, dtype=acc)
            _launch(s, t, pw, cw, scale, gl, grad, part)
        if grad_weights:
            WB = block_size(256)
            nblk = grid_block(HW, WB)
            gcw_part = torch.empty(N * C * nblk, device=s.device, dtype=acc)
            dummy = gcw_part
            _masked_mse_wgrad_kernel[(N, nblk)](
                s, t, pw if pw is not None else dummy, cw if cw is not None else dummy, gl,
                gpw if pw is not None else dummy, gcw_part, C, HW, nblk, scale,
                HAS_PW=pw is not None, HAS_CW=cw is not None, ACC=tl_acc_dtype(s.dtype), BLOCK=WB,
                num_warps=4)
            if cw is not None:
                gcw.copy_(gcw_part.view(N, C, nblk).sum(-1) * (scale * gl))
    return grad, gpw, gcw
