"""Box decoding in Triton (the device-side twin of kdops/reference/box_coders.py and
csrc/cpu/box_coders.h): per anchor, a side's distance (raw, or GFL's softmax integral over
``reg_max + 1`` bins) and the box from a prior (DistancePointBBoxCoder from a point or an anchor's
centre, optionally in stride units; DeltaXYWHBBoxCoder with means, stds and the wh-ratio clamp),
plus the gradient of GFL's integral."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_side(ptr, off, sC, c, am, DEC: tl.constexpr, R1: tl.constexpr, R1P: tl.constexpr, ACC: tl.constexpr):
    """One side's distance (gfl: softmax expectation; else the raw value) and bin probabilities."""
    if DEC == 1:
        b = tl.arange(0, R1P)
        m = am[:, None] & (b < R1)[None, :]
        z = tl.load(ptr + off[:, None] + (c * R1 + b)[None, :].to(tl.int64) * sC, mask=m, other=0.0).to(ACC)
        z = tl.where(m, z, -1e30)
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        e = tl.where(m, e, 0.0)
        p = e / tl.where(am, tl.sum(e, axis=1), 1.0)[:, None]  # masked anchors: no 0/0
        d = tl.sum(p * b[None, :].to(ACC), axis=1)
        return d, p
    else:
        d = tl.load(ptr + off + c * sC, mask=am, other=0.0).to(ACC)
        return d, d[:, None]


@triton.jit
def decode_box(ptr, off, sC, am, px1, py1, px2, py2, st, DEC: tl.constexpr, P: tl.constexpr, R1: tl.constexpr,
                R1P: tl.constexpr, ACC: tl.constexpr, HAS_STRIDE: tl.constexpr, m0, m1, m2, m3, s0, s1, s2, s3,
                max_ratio):
    d0, p0 = decode_side(ptr, off, sC, 0, am, DEC, R1, R1P, ACC)
    d1, p1 = decode_side(ptr, off, sC, 1, am, DEC, R1, R1P, ACC)
    d2, p2 = decode_side(ptr, off, sC, 2, am, DEC, R1, R1P, ACC)
    d3, p3 = decode_side(ptr, off, sC, 3, am, DEC, R1, R1P, ACC)
    if DEC == 2:
        dx = d0 * s0 + m0
        dy = d1 * s1 + m1
        dw = tl.minimum(tl.maximum(d2 * s2 + m2, -max_ratio), max_ratio)
        dh = tl.minimum(tl.maximum(d3 * s3 + m3, -max_ratio), max_ratio)
        pw = px2 - px1
        ph = py2 - py1
        gx = (px1 + px2) * 0.5 + pw * dx
        gy = (py1 + py2) * 0.5 + ph * dy
        gw = pw * tl.exp(dw)
        gh = ph * tl.exp(dh)
        return gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5, gw, gh, p0, p1, p2, p3, d0, d1, d2, d3
    else:
        if P == 2:
            px = px1
            py = py1
        else:
            px = (px2 + px1) / 2.0
            py = (py2 + py1) / 2.0
        if HAS_STRIDE:
            px = px / st
            py = py / st
        return px - d0, py - d1, px + d2, py + d3, d0, d1, p0, p1, p2, p3, d0, d1, d2, d3


@triton.jit
def gfl_grad(g_ptr, go, gsC, c, gd, p, d, f, am, R1: tl.constexpr, R1P: tl.constexpr):
    b = tl.arange(0, R1P)
    m = am[:, None] & (b < R1)[None, :]
    val = (f * gd)[:, None] * p * (b[None, :].to(p.dtype) - d[:, None])
    tl.store(g_ptr + go[:, None] + (c * R1 + b)[None, :].to(tl.int64) * gsC, val.to(g_ptr.dtype.element_ty), mask=m)
