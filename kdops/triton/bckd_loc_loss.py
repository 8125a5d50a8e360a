"""Triton kernel of kdops::bckd_loc_loss_fwd (the CUDA backend of kdops.bckd_loc_loss).

One program owns BLOCK_A anchors: the largest score gap over the classes, student and
teacher boxes decoded in registers, (G)IoU loss and the gradient back through the
decoder to the student regression; a partial loss per program. The op takes every FPN
level in one call; ``bckd_loc_loss_fwd`` launches the per-level kernel once per level.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, device_guard, grid_block, tl_acc_dtype
from ._box_coders import decode_box, gfl_grad
from .._layout import anchor_view, unview
from ._dense_head import anchor_offsets, mem_strides5
from .._dtype import acc_dtype


@triton.jit
def _share_max(a, b):
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _loc_kernel(sr_ptr, tr_ptr, sl_ptr, tl_ptr, pri_ptr, w_ptr, st_ptr, g_ptr, gw_ptr, part_ptr, A, K, H, W, J, M,
                rN, rH, rW, rJ, rC, qN, qH, qW, qJ, qC, lN, lH, lW, lJ, lC, uN, uH, uW, uJ, uC,
                gN, gH, gW, gJ, gC, stride_value, m0, m1, m2, m3, s0, s1, s2, s3, max_ratio, eps, scale,
                DEC: tl.constexpr, MODE: tl.constexpr, P: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr,
                HAS_W: tl.constexpr, HAS_ST: tl.constexpr, HAS_SV: tl.constexpr, WRITE_G: tl.constexpr,
                WRITE_GW: tl.constexpr, ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    a = pid.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    am = a < A
    lo = anchor_offsets(a, H, W, J, lN, lH, lW, lJ)
    uo = anchor_offsets(a, H, W, J, uN, uH, uW, uJ)
    gap = tl.zeros([BLOCK_A], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m = am[:, None] & (k < K)[None, :]
        x = tl.load(sl_ptr + lo[:, None] + k[None, :] * lC, mask=m, other=0.0).to(ACC)
        t = tl.load(tl_ptr + uo[:, None] + k[None, :] * uC, mask=m, other=0.0).to(ACC)
        gap = tl.maximum(gap, tl.max(tl.where(m, tl.abs(tl.sigmoid(t) - tl.sigmoid(x)), 0.0), axis=1))
    row = a % M
    px1 = tl.load(pri_ptr + row * P, mask=am, other=0.0).to(ACC)
    py1 = tl.load(pri_ptr + row * P + 1, mask=am, other=0.0).to(ACC)
    px2 = px1
    py2 = py1
    if P == 4:
        px2 = tl.load(pri_ptr + row * P + 2, mask=am, other=1.0).to(ACC)
        py2 = tl.load(pri_ptr + row * P + 3, mask=am, other=1.0).to(ACC)
    st = tl.full([BLOCK_A], 1.0, ACC) * stride_value
    if HAS_ST:
        st = tl.load(st_ptr + a, mask=am, other=1.0).to(ACC)
    ro = anchor_offsets(a, H, W, J, rN, rH, rW, rJ)
    qo = anchor_offsets(a, H, W, J, qN, qH, qW, qJ)
    x1, y1, x2, y2, e0, e1, p0, p1, p2, p3, d0, d1, d2, d3 = decode_box(
        sr_ptr, ro, rC, am, px1, py1, px2, py2, st, DEC, P, R1, R1P, ACC, HAS_ST or HAS_SV,
        m0, m1, m2, m3, s0, s1, s2, s3, max_ratio)
    X1, Y1, X2, Y2, _e0, _e1, _p0, _p1, _p2, _p3, _d0, _d1, _d2, _d3 = decode_box(
        tr_ptr, qo, qC, am, px1, py1, px2, py2, st, DEC, P, R1, R1P, ACC, HAS_ST or HAS_SV,
        m0, m1, m2, m3, s0, s1, s2, s3, max_ratio)
    # mmdet bbox_overlaps(is_aligned=True) + GIoULoss / IoULoss(linear), and the gradient in the student box
    w1 = x2 - x1
    h1 = y2 - y1
    area1 = w1 * h1
    area2 = (X2 - X1) * (Y2 - Y1)
    iwr = tl.minimum(x2, X2) - tl.maximum(x1, X1)
    ihr = tl.minimum(y2, Y2) - tl.maximum(y1, Y1)
    iw = tl.maximum(iwr, 0.0)
    ih = tl.maximum(ihr, 0.0)
    ov = iw * ih
    ur = area1 + area2 - ov
    u = tl.maximum(ur, eps)
    iou = ov / u
    if MODE == 0:
        ewr = tl.maximum(x2, X2) - tl.minimum(x1, X1)
        ehr = tl.maximum(y2, Y2) - tl.minimum(y1, Y1)
        ew = tl.maximum(ewr, 0.0)
        eh = tl.maximum(ehr, 0.0)
        er = ew * eh
        e = tl.maximum(er, eps)
        per = 1.0 - (iou - (e - u) / e)
        g_ov = -1.0 / u
        g_u = ov / (u * u) - 1.0 / e
    else:
        mi = tl.where(iou > eps, 1.0, 0.0)
        per = 1.0 - tl.maximum(iou, eps)
        g_ov = -mi / u
        g_u = mi * ov / (u * u)
    wa = gap
    if HAS_W:
        wa = gap * tl.load(w_ptr + a, mask=am, other=0.0).to(ACC)
    per = tl.where(am, per, 0.0)
    tl.store(part_ptr + pid, tl.sum(wa * per, axis=0))
    if WRITE_GW:
        tl.store(gw_ptr + a, scale * gap * per, mask=am)
    if WRITE_G:
        g_ur = g_u * _share_max(ur, eps)
        g_ovt = g_ov - g_ur
        g_iw = tl.where(iwr > 0, g_ovt * ih, 0.0)
        g_ih = tl.where(ihr > 0, g_ovt * iw, 0.0)
        gx1 = -h1 * g_ur - _share_max(x1, X1) * g_iw
        gx2 = h1 * g_ur + _share_max(X2, x2) * g_iw
        gy1 = -w1 * g_ur - _share_max(y1, Y1) * g_ih
        gy2 = w1 * g_ur + _share_max(Y2, y2) * g_ih
        if MODE == 0:
            g_er = ((u / (e * e)) * _share_max(er, eps))
            g_ew = tl.where(ewr > 0, g_er * eh, 0.0)
            g_eh = tl.where(ehr > 0, g_er * ew, 0.0)
            gx1 -= _share_max(X1, x1) * g_ew
            gx2 += _share_max(x2, X2) * g_ew
            gy1 -= _share_max(Y1, y1) * g_eh
            gy2 += _share_max(y2, Y2) * g_eh
        f = scale * wa
        go = anchor_offsets(a, H, W, J, gN, gH, gW, gJ)
        ty = g_ptr.dtype.element_ty
        if DEC == 2:
            dw = d2 * s2 + m2
            dh = d3 * s3 + m3
            r0 = (gx1 + gx2) * (px2 - px1) * s0
            r1 = (gy1 + gy2) * (py2 - py1) * s1
            r2 = tl.where((dw > -max_ratio) & (dw < max_ratio), 0.5 * (gx2 - gx1) * e0 * s2, 0.0)
            r3 = tl.where((dh > -max_ratio) & (dh < max_ratio), 0.5 * (gy2 - gy1) * e1 * s3, 0.0)
            tl.store(g_ptr + go, (f * r0).to(ty), mask=am)
            tl.store(g_ptr + go + gC, (f * r1).to(ty), mask=am)
            tl.store(g_ptr + go + 2 * gC, (f * r2).to(ty), mask=am)
            tl.store(g_ptr + go + 3 * gC, (f * r3).to(ty), mask=am)
        elif DEC == 0:
            tl.store(g_ptr + go, (-f * gx1).to(ty), mask=am)
            tl.store(g_ptr + go + gC, (-f * gy1).to(ty), mask=am)
            tl.store(g_ptr + go + 2 * gC, (f * gx2).to(ty), mask=am)
            tl.store(g_ptr + go + 3 * gC, (f * gy2).to(ty), mask=am)
        else:
            gfl_grad(g_ptr, go, gC, 0, -gx1, p0, d0, f, am, R1, R1P)
            gfl_grad(g_ptr, go, gC, 1, -gy1, p1, d1, f, am, R1, R1P)
            gfl_grad(g_ptr, go, gC, 2, gx2, p2, d2, f, am, R1, R1P)
            gfl_grad(g_ptr, go, gC, 3, gy2, p3, d3, f, am, R1, R1P)


def bckd_loc_level_fwd(student_reg, teacher_reg, student_logits, teacher_logits, priors, weight, stride, stride_value,
                       decoder, loss, reg_max, means, stds, max_ratio, scale, grad_reg, grad_weight):
    """One level: strided (N,H,W,J,C) views of the head tensors, priors / weight / stride in the
    accumulation dtype (weight and stride flat (A,)); returns (0-d loss, grad in the view's
    shape, grad_weight (A,))."""
    N, H, W, J, D = student_reg.shape
    K = student_logits.shape[-1]
    A = N * H * W * J
    acc = acc_dtype(student_reg)
    grad = torch.empty_like(student_reg) if grad_reg else student_reg.new_empty((0,))
    w = weight.contiguous() if weight is not None else None
    gw = student_reg.new_empty((A,), dtype=acc) if (grad_weight and w is not None) else student_reg.new_empty((0,), dtype=acc)
    if A == 0:
        return student_reg.new_zeros((), dtype=acc), grad, gw
    pri = priors.contiguous()
    st = stride.contiguous() if stride is not None else None
    BLOCK_A = 64 if INTERPRET else 32
    BLOCK_K = 128 if INTERPRET else 32
    R1 = reg_max + 1
    nprog = grid_block(A, BLOCK_A)
    part = torch.empty(nprog, device=student_reg.device, dtype=acc)
    with device_guard(student_reg):
        _loc_kernel[(nprog,)](
            student_reg, teacher_reg, student_logits, teacher_logits, pri, w if w is not None else part,
            st if st is not None else part, grad if grad_reg else student_reg, gw if gw.numel() else part, part,
            A, K, H, W, J, pri.shape[0], *mem_strides5(student_reg), *mem_strides5(teacher_reg),
            *mem_strides5(student_logits), *mem_strides5(teacher_logits),
            *mem_strides5(grad if grad_reg else student_reg), float(stride_value),
            *[float(v) for v in means], *[float(v) for v in stds], float(max_ratio), 1e-6, float(scale),
            DEC=int(decoder), MODE=int(loss), P=pri.shape[1], R1=R1, R1P=triton.next_power_of_2(R1),
            HAS_W=w is not None, HAS_ST=st is not None, HAS_SV=float(stride_value) > 0, WRITE_G=grad_reg,
            WRITE_GW=gw.numel() > 0, ACC=tl_acc_dtype(student_reg.dtype), BLOCK_A=BLOCK_A, BLOCK_K=BLOCK_K,
            num_warps=4)
    return part.sum() * scale, grad, gw


def bckd_loc_loss_fwd(student_reg, teacher_reg, student_logits, teacher_logits, priors, weight, stride, stride_value,
                 decoder, loss, reg_max, means, stds, max_ratio, scale, grad_reg, grad_weight):
    """Same contract as the kdops::bckd_loc_loss_fwd schema (csrc/ops.cpp): every FPN level, one launch
    per level; returns ((L,) losses, grads in the inputs' shapes, weight grads in the weights')."""
    D = 4 * (reg_max + 1) if decoder == 1 else 4
    acc = torch.float64 if any(s.dtype == torch.float64 for s in student_reg) else torch.float32
    losses, grads, gws = [], [], []
    for sr, tr, sl, tl_, pr, w, st, sv, sc in zip(student_reg, teacher_reg, student_logits, teacher_logits, priors,
                                                   weight, stride, stride_value, scale):
        J = sr.shape[1] // D if sr.dim() == 4 else 1
        K = sl.shape[1] // J
        lacc = acc_dtype(sr)
        out, g, gw = bckd_loc_level_fwd(
            anchor_view(sr, D), anchor_view(tr, D), anchor_view(sl, K), anchor_view(tl_, K), pr.to(lacc),
            w.reshape(-1).to(lacc) if w is not None else None, st.reshape(-1).to(lacc) if st is not None else None,
            sv, decoder, loss, reg_max, means, stds, max_ratio, sc, grad_reg, grad_weight and w is not None)
        losses.append(out.to(acc))
        grads.append(unview(g, sr) if grad_reg else g)
        gws.append(gw.reshape(w.shape).to(w.dtype) if (grad_weight and w is not None) else gw.to(acc))
    return torch.stack(losses), grads, gws
