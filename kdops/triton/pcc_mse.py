"""Triton kernels of kdops::pcc_mse_fwd (the CUDA backend).

A group is what one mean/std is taken over (a channel over (N,H,W), or a plane
(n,c) over (H,W)); it is `runs` runs of H*W contiguous elements. Pass 1: each
program takes BLOCK elements of one group and writes (count, means, centred second
moments, co-moment), exact within the block; torch merges them per group with the
parallel-variance formula (in float64) and derives the per-group coefficients.
Pass 2 reads s,t again for the exact loss. Backward runs the pass-2 kernel once more,
writing the gradients scaled by grad_output (read on the device: no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size, device_guard, grid_block, tl_acc_dtype
from .._dtype import acc_dtype


@triton.jit
def _group_offsets(g, k, M, HW, run_stride, BLOCK: tl.constexpr):
    j = k.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < M
    r = j // HW
    return g.to(tl.int64) * HW + r * run_stride + (j - r * HW), m


@triton.jit
def _pcc_stats_kernel(s_ptr, t_ptr, part_ptr, M, HW, run_stride, nchunks,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    k = tl.program_id(1)
    off, m = _group_offsets(g, k, M, HW, run_stride, BLOCK)
    s = tl.load(s_ptr + off, mask=m, other=0.0).to(ACC)
    t = tl.load(t_ptr + off, mask=m, other=0.0).to(ACC)
    cnt = tl.sum(m.to(ACC), axis=0)
    mus = tl.sum(s, axis=0) / tl.maximum(cnt, 1.0)
    mut = tl.sum(t, axis=0) / tl.maximum(cnt, 1.0)
    a = tl.where(m, s - mus, 0.0)
    b = tl.where(m, t - mut, 0.0)
    base = part_ptr + (g.to(tl.int64) * nchunks + k) * 6
    tl.store(base + 0, cnt)
    tl.store(base + 1, mus)
    tl.store(base + 2, mut)
    tl.store(base + 3, tl.sum(a * a, axis=0))
    tl.store(base + 4, tl.sum(b * b, axis=0))
    tl.store(base + 5, tl.sum(a * b, axis=0))


@triton.jit
def _pcc_loss_grad_kernel(s_ptr, t_ptr, coef_ptr, gl_ptr, gs_ptr, gt_ptr, part_ptr, M, HW, run_stride, nchunks,
                          GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    g = tl.program_id(0)
    k = tl.program_id(1)
    off, m = _group_offsets(g, k, M, HW, run_stride, BLOCK)
    cp = coef_ptr + g.to(tl.int64) * 8
    mus = tl.load(cp + 0)
    mut = tl.load(cp + 1)
    ids = tl.load(cp + 2)
    idt = tl.load(cp + 3)
    # masked-off lanes are zeroed so nothing out of range is even computed
    a = tl.where(m, (tl.load(s_ptr + off, mask=m, other=0.0).to(ACC) - mus) * ids, 0.0)
    b = tl.where(m, (tl.load(t_ptr + off, mask=m, other=0.0).to(ACC) - mut) * idt, 0.0)
    d = a - b
    tl.store(part_ptr + g.to(tl.int64) * nchunks + k, tl.sum(d * d, axis=0))
    if GRAD_S:
        gs = tl.load(gl_ptr).to(ACC) * tl.load(cp + 4) * (tl.load(cp + 6) * a - b)
        tl.store(gs_ptr + off, gs.to(gs_ptr.dtype.element_ty), mask=m)
    if GRAD_T:
        gt = tl.load(gl_ptr).to(ACC) * tl.load(cp + 5) * (tl.load(cp + 7) * b - a)
        tl.store(gt_ptr + off, gt.to(gt_ptr.dtype.element_ty), mask=m)


def group_coefficients(parts: torch.Tensor, norm: int, eps: float, scale: float) -> torch.Tensor:
    """Merges per-block moments (G, chunks, 6) and returns per-group (G, 8) coefficients
    [mu_s, mu_t, 1/d_s, 1/d_t, 2*scale/d_s, 2*scale/d_t, 1-k_s, 1-k_t] in float64."""
    p = parts.double()
    cnt, ms, mt, m2s, m2t, cst = p.unbind(-1)
    M = cnt.sum(1)
    Mc = M.clamp(min=1)
    mus = (cnt * ms).sum(1) / Mc
    mut = (cnt * mt).sum(1) / Mc
    dms, dmt = ms - mus[:, None], mt - mut[:, None]
    M2s = (m2s + cnt * dms * dms).sum(1).clamp(min=0)
    M2t = (m2t + cnt * dmt * dmt).sum(1).clamp(min=0)
    Cst = (cst + cnt * dms * dmt).sum(1)
    if norm == 0:
        dof = (M - 1).clamp(min=1)
        sig_s = torch.where(M > 1, (M2s / dof).sqrt(), torch.zeros_like(M))
        sig_t = torch.where(M > 1, (M2t / dof).sqrt(), torch.zeros_like(M))
        ds, dt = sig_s + eps, sig_t + eps
    else:
        ds, dt = (M2s / Mc + eps).sqrt(), (M2t / Mc + eps).sqrt()
    saa, sbb, sab = M2s / (ds * ds), M2t / (dt * dt), Cst / (ds * dt)
    if norm == 0:
        # the std-derivative term; its limit is 0 for a constant group
        ks = torch.where(sig_s > 0, ds * (saa - sab) / (dof * sig_s.clamp(min=1e-300)), torch.zeros_like(M))
        kt = torch.where(sig_t > 0, dt * (sbb - sab) / (dof * sig_t.clamp(min=1e-300)), torch.zeros_like(M))
    else:
        ks, kt = (saa - sab) / Mc, (sbb - sab) / Mc
    return torch.stack([mus, mut, 1 / ds, 1 / dt, 2 * scale / ds, 2 * scale / dt, 1 - ks, 1 - kt], dim=1)


def _geometry(s, norm):
    N, C, H, W = s.shape
    HW = H * W
    G, M = (C, N * HW) if norm == 0 else (N * C, HW)
    BLOCK = block_size(1024)
    return G, M, HW, C * HW, BLOCK, grid_block(M, BLOCK)


def _loss_grad(s, t, coef, gl, gs, gt, norm):
    G, M, HW, run_stride, BLOCK, nchunks = _geometry(s, norm)
    acc = acc_dtype(s)
    part = torch.empty((G, nchunks), device=s.device, dtype=acc)
    _pcc_loss_grad_kernel[(G, nchunks)](s, t, coef.to(acc).contiguous(), gl if gl is not None else part,
                                        gs if gs is not None else s, gt if gt is not None else t,
                                        part, M, HW, run_stride, nchunks,
                                        GRAD_S=gs is not None, GRAD_T=gt is not None,
                                        ACC=tl_acc_dtype(s.dtype), BLOCK=BLOCK, num_warps=4)
    return part


def pcc_mse_fwd(student, teacher, norm: int, eps: float):
    """Same contract as the kdops::pcc_mse_fwd schema (csrc/ops.cpp)."""
    s, t = student.contiguous(), teacher.contiguous()
    acc = acc_dtype(s)
    G, M, HW, run_stride, BLOCK, nchunks = _geometry(s, norm)
    if s.numel() == 0:
        return s.new_zeros((), dtype=acc), s.new_zeros((G, 8), dtype=torch.float64)
    scale = 1.0 / s.numel()
    with device_guard(s):
        parts = torch.empty((G, nchunks, 6), device=s.device, dtype=acc)
        _pcc_stats_kernel[(G, nchunks)](s, t, parts, M, HW, run_stride, nchunks,
                                        ACC=tl_acc_dtype(s.dtype), BLOCK=BLOCK, num_warps=4)
        coef = group_coefficients(parts, norm, eps, scale)
        part = _loss_grad(s, t, coef, None, None, None, norm)
    return part.sum() * scale, coef


def pcc_mse_fwd_grad(student, teacher, norm: int, eps: float, scale: float):
    """Same contract as the kdops::pcc_mse_fwd_grad schema (csrc/ops.cpp): the loss times ``scale`` and
    the student's gradient of that (kdops/ops calls it on the CPU only; here for a complete op: forward
    + backward)."""
    loss, coeffs = pcc_mse_fwd(student, teacher, norm, eps)
    gs, _ = pcc_mse_bwd(torch.full((), scale, device=loss.device, dtype=loss.dtype), student, teacher, coeffs, norm,
                        True, False)
    return loss * scale, gs


def pcc_mse_bwd(grad_loss, student, teacher, coeffs, norm: int, grad_student: bool, grad_teacher: bool):
    """Same contract as the kdops::pcc_mse_bwd schema (csrc/ops.cpp)."""
    s, t = student.contiguous(), teacher.contiguous()
    gs = torch.empty_like(s) if grad_student else s.new_empty((0,))
    gt = torch.empty_like(t) if grad_teacher else t.new_empty((0,))
    if s.numel() == 0 or not (grad_student or grad_teacher):
        return gs, gt
    acc = acc_dtype(s)
    with device_guard(s):
        _loss_grad(s, t, coeffs, grad_loss.reshape(1).to(acc), gs if grad_student else None,
                   gt if grad_teacher else None, norm)
    return gs, gt
