"""Triton kernels of kdops::masked_mse_fwd (the CUDA backend).

Forward: one program per BLOCK elements of the flattened (N,C,H,W) tensor reads
student and teacher once, gathers its pixel and channel weights (small, cache
resident), writes the gradient 2*scale*w*(s-t) and one partial loss. Partials are
summed by torch (deterministic). The weight gradients, needed only when a weight
requires grad, come from a second kernel that walks the channels of a pixel run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import acc_dtype, block_size, device_guard, grid_block


@triton.jit
def _masked_mse_fwd_kernel(s_ptr, t_ptr, pw_ptr, cw_ptr, g_ptr, part_ptr, numel, C, HW, gscale,
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
        tl.store(g_ptr + offs, (gscale * wd).to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masked_mse_wgrad_kernel(s_ptr, t_ptr, pw_ptr, cw_ptr, gpw_ptr, gcw_part_ptr, C, HW, nblk, scale,
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
        tl.store(gpw_ptr + n * HW + hw, scale * acc, mask=m)


def masked_mse_fwd(student, teacher, pixel_weight, channel_weight, scale: float, grad_input: bool,
                   grad_weights: bool):
    """Same contract as the kdops::masked_mse_fwd schema (csrc/ops.cpp)."""
    s, t = student.contiguous(), teacher.contiguous()
    N, C, H, W = s.shape
    HW, numel = H * W, s.numel()
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    pw = pixel_weight.contiguous() if pixel_weight is not None else None
    cw = channel_weight.contiguous() if channel_weight is not None else None
    grad = torch.empty_like(s) if grad_input else s.new_empty((0,))
    gpw = torch.empty_like(pw) if (grad_weights and pw is not None) else s.new_empty((0,), dtype=acc)
    gcw = torch.empty_like(cw) if (grad_weights and cw is not None) else s.new_empty((0,), dtype=acc)
    if numel == 0:
        if gpw.numel():
            gpw.zero_()
        if gcw.numel():
            gcw.zero_()
        return s.new_zeros((), dtype=acc), grad, gpw, gcw
    BLOCK = block_size(1024)
    nprog = grid_block(numel, BLOCK)
    part = torch.empty(nprog, device=s.device, dtype=acc)
    dummy = part  # never read when the matching HAS_* flag is off
    with device_guard(s):
        _masked_mse_fwd_kernel[(nprog,)](
            s, t, pw if pw is not None else dummy, cw if cw is not None else dummy,
            grad if grad_input else s, part, numel, C, HW, 2.0 * scale,
            HAS_PW=pw is not None, HAS_CW=cw is not None, WRITE_GRAD=grad_input,
            ACC=acc_dtype(s.dtype), BLOCK=BLOCK, num_warps=4)
        if grad_weights:
            WB = block_size(256)
            nblk = grid_block(HW, WB)
            gcw_part = torch.empty(N * C * nblk, device=s.device, dtype=acc)
            _masked_mse_wgrad_kernel[(N, nblk)](
                s, t, pw if pw is not None else dummy, cw if cw is not None else dummy,
                gpw if pw is not None else dummy, gcw_part, C, HW, nblk, scale,
                HAS_PW=pw is not None, HAS_CW=cw is not None, ACC=acc_dtype(s.dtype), BLOCK=WB,
                num_warps=4)
            if cw is not None:
                gcw.copy_(gcw_part.view(N, C, nblk).sum(-1) * scale)
    return part.sum() * scale, grad, gpw, gcw
