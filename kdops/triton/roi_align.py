"""Triton kernels of kdops::roi_align_fwd / _bwd (the CUDA backend; see kdops/ops/roi_align.py).

The math is the reference's (kdops/reference/roi_align.py, mmcv's RoIAlign in avg mode) step by
step, in float32 (float64 for float64): the same roi_start / bin / grid expressions, the same
order of the sums (samples row by row, each sample's ``w1 v1 + w2 v2 + w3 v3 + w4 v4`` added in
turn, then one division by the count), IEEE divisions (``tl.fdiv(ieee_rounding=True)`` in fp32:
Triton's fp32 ``/`` is the approximate one) and no fused multiply-adds (``enable_fp_fusion=False``),
so the forward is meant to match the reference bit for bit (it does under the interpreter).

One launch per level (each level has its own pointer and strides); a program whose RoI is on
another level, or whose image index is outside [0,N), does nothing (its loops run 0 times), and
its rows stay the zeros the launcher filled them with.

- forward ``_fwd_kernel``: one program per (RoI, channel block, bin block), a [BLOCK_C, BLOCK_P]
  tile (channels x flattened out_h*out_w bins) accumulated over the bins' samples; each of the 4
  bilinear corners is a masked gather of the tile through the features' strides (any layout).
- backward, default ``_bwd_atomic_kernel``: the same programs scatter ``w * grad / count`` into
  an fp32 (fp64 for fp64) buffer per level with ``tl.atomic_add`` (no fp16/bf16 atomics), cast
  to grad's dtype at the end.
- backward, deterministic (``torch.are_deterministic_algorithms_enabled()``):
  ``_bwd_plane_kernel``, one program per (image, channel block) of a level, owning those planes
  of the fp32 buffer: it walks every RoI in index order, skips those not on its (level, image),
  and adds each bin's samples one at a time, a sample's 4 corners as one plain load/add/store of
  a [BLOCK_C, 4] tile (a corner clamped onto another has weight exactly 0 and is masked out, so
  the 4 addresses of a channel are distinct). BLOCK_C >= 32 with one warp: every element belongs
  to one thread (none is replicated), so each thread reads back only what it wrote itself, and
  the loop is not pipelined (num_stages=1): race-free, and each pixel's sum has a fixed order,
  bitwise reproducible, no atomics. Its parallelism is only L * N * C / BLOCK_C programs, each
  walking all R RoIs and their samples serially: the slow path.

Sample grid (``sampling_ratio`` = 0): mmcv loops over ceil(bin) samples per bin and axis, which
is unbounded for a huge RoI. Samples outside [-1,H] x [-1,W] add exactly 0, and with the adaptive
grid samples are more than half a pixel apart, so at most 2H+3 rows (2W+3 columns) of a bin can
be inside: each bin loops only over the window of sample indices around the map (solved from the
same expressions, widened by 2 samples each side against rounding, capped at 2H+16 / 2W+16
iterations), which gives the same sum as the full loop. Where mmcv is undefined, by definition:
- a non-finite grid (a NaN or infinite RoI: mmcv's int cast of it is undefined) counts as 0
  samples, as the reference does: the row is zeros (a NaN coordinate with sampling_ratio > 0
  gives NaN sample points, outside the map: zeros too);
- a window starting at sample index 2^24 (2^53 in float64) or beyond, where the index is not
  exact in the accumulation type, is dropped (a bin over 16M pixels wide in float32).
So every loop ends, after at most (2H+16)(2W+16) samples per bin. With sampling_ratio > 0 every
one of the sampling_ratio^2 samples of a bin is visited (as mmcv).

No access leaves the maps whatever the values: the image index is range-checked as a float
(int(trunc(b)) in [0,N) <=> -1 < b < N, NaN fails), sample points outside the map are masked and
the corners are clamped to [0,H-1] x [0,W-1]; levels outside [0,L) match no launch. Offsets are
int64. The launchers never read device values (the grids depend on shapes only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import constant
from .._dtype import acc_dtype
from . import block_size, device_guard, tl_acc_dtype

_INF: tl.constexpr = tl.constexpr(float("inf"))


@triton.jit
def _roi(rois_ptr, levels_ptr, scales_ptr, r, lvl, N, out_h, out_w, SR, ALIGNED: tl.constexpr,
         ACC: tl.constexpr):
    """RoI r seen from level lvl: whether it is on lvl with an image in [0,N) (``mine``), its
    image b, (y1, bin_h, grid_h), (x1, bin_w, grid_w) and the count, as the reference computes
    them. A non-finite grid gets ``count`` 1 (and no samples: see _window)."""
    row = rois_ptr + r * 5
    bf = tl.load(row).to(ACC)
    # mmcv: int roi_batch_ind = roi[0] (truncation): in [0,N) <=> -1 < b < N; NaN is not
    mine = (tl.load(levels_ptr + r) == lvl) & (bf > -1.0) & (bf < N)
    b = tl.where(mine, bf, 0.0).to(tl.int64)
    scale = tl.load(scales_ptr + lvl)
    off = 0.5 if ALIGNED else 0.0
    x1 = tl.load(row + 1).to(ACC) * scale - off
    y1 = tl.load(row + 2).to(ACC) * scale - off
    rw = (tl.load(row + 3).to(ACC) * scale - off) - x1
    rh = (tl.load(row + 4).to(ACC) * scale - off) - y1
    if not ALIGNED:  # malformed RoIs forced to 1x1 (a NaN stays NaN, as torch's clamp)
        rw = tl.where(rw < 1.0, 1.0, rw)
        rh = tl.where(rh < 1.0, 1.0, rh)
    bh = tl.fdiv(rh, tl.cast(out_h, ACC), ieee_rounding=ACC == tl.float32)
    bw = tl.fdiv(rw, tl.cast(out_w, ACC), ieee_rounding=ACC == tl.float32)
    gh = tl.where(SR > 0, tl.cast(SR, ACC), tl.ceil(bh))
    gw = tl.where(SR > 0, tl.cast(SR, ACC), tl.ceil(bw))
    count = gh * gw
    count = tl.where(count < 1.0, 1.0, count)
    finite = (tl.abs(gh) < _INF) & (tl.abs(gw) < _INF)
    count = tl.where(finite, count, 1.0)
    return mine, b, y1, bh, gh, x1, bw, gw, count


@triton.jit
def _window(base, bin_, grid, SR, LIM, ACC: tl.constexpr):
    """Sample indices [lo, lo + n) of a bin starting at ``base`` (per axis; base is a scalar or a
    vector of bins) that hold every sample of the bin inside [-1, LIM]: all of [0, SR) when
    SR > 0, else the window around the map (see the module docstring); n = 0 for a bin with no
    sample (grid < 1) or a non-finite grid."""
    lim = tl.cast(LIM, ACC)
    spacing = tl.fdiv(bin_, grid, ieee_rounding=ACC == tl.float32)
    k_lo = tl.fdiv(-1.0 - base, spacing, ieee_rounding=ACC == tl.float32) - 0.5  # base + (k + 0.5) * spacing == -1
    k_hi = tl.fdiv(lim - base, spacing, ieee_rounding=ACC == tl.float32) - 0.5  # ... == LIM
    lo = tl.floor(k_lo) - 2.0  # 2 samples of slack either side against rounding
    hi = tl.ceil(k_hi) + 3.0  # exclusive
    lo = tl.where(lo > 0.0, lo, 0.0)  # NaN -> 0
    hi = tl.where(hi < grid, hi, grid)
    n = hi - lo
    n = tl.where(n > 0.0, n, 0.0)  # NaN -> 0
    # spacing > 1/2 when grid >= 2: a window is at most (LIM + 1) / spacing + 7 < 2 LIM + 9 long;
    # the cap only bounds the loop when rounding has made nonsense of the window
    cap = 2.0 * lim + 16.0
    n = tl.where(n < cap, n, cap)
    # indices from 2^24 (2^53 in fp64) on are not exact in ACC (nor are the reference's sample
    # points there): such windows are dropped
    ok = (grid >= 1.0) & (grid < _INF)  # a scalar (one RoI) ...
    exact = lo < (9007199254740992.0 if ACC == tl.float64 else 16777216.0)  # ... and per bin
    # (nested wheres: the interpreter mis-types a scalar bool & a vector bool)
    lo = tl.where(SR > 0, 0, tl.where(ok, tl.where(exact, lo, 0.0), 0.0).to(tl.int64))
    n = tl.where(SR > 0, tl.cast(SR, tl.int64), tl.where(ok, tl.where(exact, n, 0.0), 0.0).to(tl.int64))
    return lo, n


@triton.jit
def _bilinear(ybase, bh, gh, iy, xbase, bw, gw, ix, ok, H, W, ACC: tl.constexpr):
    """Sample (iy, ix) of a bin: its point roi_start + p * bin + (i + 0.5) * bin / grid per axis
    (base = roi_start + p * bin: the reference's order of operations), then mmcv's
    bilinear_interpolate: zero outside [-1,H] x [-1,W] (and where ``ok`` is false), coordinates
    below 0 clamped to 0, corners past the last row / column clamped to it. Returns the mask, the
    corner rows / columns (int64, always inside the map) and the four weights. (One helper per
    sample: each nested jit call costs ~1 ms under the interpreter.)"""
    y = ybase + tl.fdiv((tl.cast(iy, ACC) + 0.5) * bh, gh, ieee_rounding=ACC == tl.float32)
    x = xbase + tl.fdiv((tl.cast(ix, ACC) + 0.5) * bw, gw, ieee_rounding=ACC == tl.float32)
    valid = ok & (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y = tl.where(valid, y, 0.0)  # NaN / far points never reach the integer casts
    x = tl.where(valid, x, 0.0)
    y = tl.where(y <= 0.0, 0.0, y)
    x = tl.where(x <= 0.0, 0.0, x)
    y_low = y.to(tl.int64)
    x_low = x.to(tl.int64)
    top_y = y_low >= H - 1
    top_x = x_low >= W - 1
    y_low = tl.where(top_y, H - 1, y_low)
    x_low = tl.where(top_x, W - 1, x_low)
    y = tl.where(top_y, tl.cast(y_low, ACC), y)
    x = tl.where(top_x, tl.cast(x_low, ACC), x)
    y_high = tl.where(top_y, y_low, y_low + 1)
    x_high = tl.where(top_x, x_low, x_low + 1)
    ly = y - tl.cast(y_low, ACC)
    lx = x - tl.cast(x_low, ACC)
    hy = 1.0 - ly
    hx = 1.0 - lx
    w1 = tl.where(valid, hy * hx, 0.0)
    w2 = tl.where(valid, hy * lx, 0.0)
    w3 = tl.where(valid, ly * hx, 0.0)
    w4 = tl.where(valid, ly * lx, 0.0)
    return valid, y_low, y_high, x_low, x_high, w1, w2, w3, w4


@triton.jit
def _tile_geometry(rois_ptr, levels_ptr, scales_ptr, lvl, N, H, W, out_h, out_w, SR, ALIGNED: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """This (RoI, channel block, bin block) program's RoI and bins: the per-bin starts and sample
    windows (vectors over the bins) and the loop bounds (the longest window)."""
    r = tl.program_id(0).to(tl.int64)
    mine, b, y1, bh, gh, x1, bw, gw, count = _roi(rois_ptr, levels_ptr, scales_ptr, r, lvl, N, out_h, out_w, SR,
                                                  ALIGNED, ACC)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < out_h * out_w
    ph = p // out_w
    pw = p - ph * out_w
    ybase = y1 + tl.cast(ph, ACC) * bh
    xbase = x1 + tl.cast(pw, ACC) * bw
    ylo, ny = _window(ybase, bh, gh, SR, H, ACC)
    xlo, nx = _window(xbase, bw, gw, SR, W, ACC)
    ny = tl.where(mine & pm, ny, 0)
    nx = tl.where(mine & pm, nx, 0)
    return r, mine, b, p, pm, ybase, bh, gh, ylo, ny, xbase, bw, gw, xlo, nx, count


@triton.jit
def _fwd_kernel(f_ptr, rois_ptr, levels_ptr, scales_ptr, out_ptr, lvl, N, C, H, W, s_n, s_c, s_h, s_w,
                out_h, out_w, SR, ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr):
    r, mine, b, p, pm, ybase, bh, gh, ylo, ny, xbase, bw, gw, xlo, nx, count = _tile_geometry(
        rois_ptr, levels_ptr, scales_ptr, lvl, N, H, W, out_h, out_w, SR, ALIGNED, ACC, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    plane = f_ptr + b * s_n + cs.to(tl.int64)[:, None] * s_c  # [BLOCK_C, 1]
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for ty in range(tl.max(ny, axis=0)):
        for tx in range(tl.max(nx, axis=0)):
            valid, yl, yh, xl, xh, w1, w2, w3, w4 = _bilinear(ybase, bh, gh, ylo + ty, xbase, bw, gw, xlo + tx,
                                                              (ty < ny) & (tx < nx), H, W, ACC)
            m = cm[:, None] & valid[None, :]
            v1 = tl.load(plane + (yl * s_h + xl * s_w)[None, :], mask=m, other=0.0).to(ACC)
            v2 = tl.load(plane + (yl * s_h + xh * s_w)[None, :], mask=m, other=0.0).to(ACC)
            v3 = tl.load(plane + (yh * s_h + xl * s_w)[None, :], mask=m, other=0.0).to(ACC)
            v4 = tl.load(plane + (yh * s_h + xh * s_w)[None, :], mask=m, other=0.0).to(ACC)
            acc += ((w1[None, :] * v1 + w2[None, :] * v2) + w3[None, :] * v3) + w4[None, :] * v4
    out = tl.fdiv(acc, count, ieee_rounding=ACC == tl.float32)
    dst = out_ptr + (r * C + cs.to(tl.int64))[:, None] * (out_h * out_w) + p[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mine & cm[:, None] & pm[None, :])


@triton.jit
def _bwd_atomic_kernel(g_ptr, rois_ptr, levels_ptr, scales_ptr, buf_ptr, lvl, N, C, H, W, out_h, out_w, SR,
                       ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # the forward's programs, scattering w * grad / count into the contiguous (N,C,H,W) buffer
    r, mine, b, p, pm, ybase, bh, gh, ylo, ny, xbase, bw, gw, xlo, nx, count = _tile_geometry(
        rois_ptr, levels_ptr, scales_ptr, lvl, N, H, W, out_h, out_w, SR, ALIGNED, ACC, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    src = g_ptr + (r * C + cs.to(tl.int64))[:, None] * (out_h * out_w) + p[None, :]
    g = tl.load(src, mask=mine & cm[:, None] & pm[None, :], other=0.0).to(ACC)
    g = tl.fdiv(g, count, ieee_rounding=ACC == tl.float32)
    plane = buf_ptr + (b * C + cs.to(tl.int64))[:, None] * H * W  # [BLOCK_C, 1]
    for ty in range(tl.max(ny, axis=0)):
        for tx in range(tl.max(nx, axis=0)):
            valid, yl, yh, xl, xh, w1, w2, w3, w4 = _bilinear(ybase, bh, gh, ylo + ty, xbase, bw, gw, xlo + tx,
                                                              (ty < ny) & (tx < nx), H, W, ACC)
            m = cm[:, None] & valid[None, :]
            tl.atomic_add(plane + (yl * W + xl)[None, :], w1[None, :] * g, mask=m)
            tl.atomic_add(plane + (yl * W + xh)[None, :], w2[None, :] * g, mask=m)
            tl.atomic_add(plane + (yh * W + xl)[None, :], w3[None, :] * g, mask=m)
            tl.atomic_add(plane + (yh * W + xh)[None, :], w4[None, :] * g, mask=m)


@triton.jit
def _bwd_plane_kernel(g_ptr, rois_ptr, levels_ptr, scales_ptr, buf_ptr, R, lvl, N, C, H, W, out_h, out_w, SR,
                      ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # the image whose planes this program owns
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    plane = buf_ptr + (n * C + cs.to(tl.int64)) * H * W  # [BLOCK_C]
    P = out_h * out_w
    k = tl.arange(0, 4)  # the 4 corners of a sample
    dy = k // 2
    dx = k - 2 * dy
    for i in range(R):  # every RoI, in index order
        r = tl.cast(i, tl.int64)
        mine, b, y1, bh, gh, x1, bw, gw, count = _roi(rois_ptr, levels_ptr, scales_ptr, r, lvl, N, out_h, out_w,
                                                      SR, ALIGNED, ACC)
        src = g_ptr + (r * C + cs.to(tl.int64)) * P
        for p in range(tl.where(mine & (b == n), P, 0)):  # the bins, one at a time
            g = tl.fdiv(tl.load(src + p, mask=cm, other=0.0).to(ACC), count, ieee_rounding=ACC == tl.float32)
            ph = p // out_w
            ybase = y1 + tl.cast(ph, ACC) * bh
            xbase = x1 + tl.cast(p - ph * out_w, ACC) * bw
            ylo, ny = _window(ybase, bh, gh, SR, H, ACC)
            xlo, nx = _window(xbase, bw, gw, SR, W, ACC)
            for ty in range(ny):
                for tx in range(nx):  # the samples, one at a time
                    valid, yl, yh, xl, xh, w1, w2, w3, w4 = _bilinear(ybase, bh, gh, ylo + ty, xbase, bw, gw,
                                                                      xlo + tx, True, H, W, ACC)
                    # plane[c, corner] += w_corner * g[c]: a [BLOCK_C, 4] read-modify-write of this
                    # thread's own elements. A corner clamped onto another (last row / column) has
                    # weight exactly 0 and is skipped, so a lane's 4 addresses are distinct.
                    off = tl.where(dy == 1, yh, yl) * W + tl.where(dx == 1, xh, xl)
                    w = tl.where(k == 0, w1, tl.where(k == 1, w2, tl.where(k == 2, w3, w4)))
                    m = cm[:, None] & (valid & ~(((dy == 1) & (yh == yl)) | ((dx == 1) & (xh == xl))))[None, :]
                    ptr = plane[:, None] + off[None, :]
                    tl.store(ptr, tl.load(ptr, mask=m, other=0.0) + w[None, :] * g[:, None], mask=m)


def _blocks(C, P):
    """(BLOCK_C, BLOCK_P) of the (RoI, channel block, bin block) programs: bins of a 7x7 / 14x14
    head in one or two blocks, a tile of about 2048 elements (bigger under the interpreter)."""
    block_p = min(triton.next_power_of_2(max(P, 1)), block_size(256))
    block_c = min(triton.next_power_of_2(max(C, 1)), max(1, block_size(2048) // block_p))
    return block_c, block_p


def _scales(scales, like):
    return constant([float(s) for s in scales], like=like, dtype=acc_dtype(like))


def roi_align_fwd(features, rois, levels, scales, out_h, out_w, sampling_ratio, aligned):
    """Same contract as the kdops::roi_align_fwd schema (csrc/ops.cpp)."""
    if len(scales) < len(features):
        raise ValueError(f"roi_align_fwd: {len(features)} levels but {len(scales)} scales")
    f0 = features[0]
    R, C = rois.shape[0], f0.shape[1]
    out = f0.new_zeros((R, C, out_h, out_w))
    if out.numel() == 0:
        return out
    rois, levels, sc = rois.contiguous(), levels.contiguous(), _scales(scales, f0)
    P = out_h * out_w
    BLOCK_C, BLOCK_P = _blocks(C, P)
    grid = (R, triton.cdiv(C, BLOCK_C), triton.cdiv(P, BLOCK_P))
    with device_guard(out):
        for lvl, f in enumerate(features):
            N, _, H, W = f.shape
            if f.numel() == 0:
                continue
            _fwd_kernel[grid](f, rois, levels, sc, out, lvl, N, C, H, W, *f.stride(), out_h, out_w,
                              int(sampling_ratio), ALIGNED=bool(aligned), ACC=tl_acc_dtype(f0.dtype),
                              BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4, enable_fp_fusion=False)
    return out


def roi_align_bwd(grad, rois, levels, scales, sampling_ratio, aligned, sizes):
    """Same contract as the kdops::roi_align_bwd schema (csrc/ops.cpp). Float atomics unless
    torch.are_deterministic_algorithms_enabled(), then the (bitwise reproducible) plane owners."""
    sizes = [int(s) for s in sizes]
    dims = [tuple(sizes[i:i + 4]) for i in range(0, len(sizes), 4)]
    if len(scales) < len(dims):
        raise ValueError(f"roi_align_bwd: {len(dims)} levels but {len(scales)} scales")
    g = grad.contiguous()
    R, C, out_h, out_w = g.shape
    P = out_h * out_w
    if R * C * P == 0:
        return [grad.new_zeros(d) for d in dims]
    rois, levels, sc = rois.contiguous(), levels.contiguous(), _scales(scales, g)
    acc, ACC = acc_dtype(g), tl_acc_dtype(g.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:  # one channel per lane: no element shared by two threads (see the docstring)
        num_warps = 1
        BLOCK_C = max(32, min(triton.next_power_of_2(C), block_size(32)))
    else:
        BLOCK_C, BLOCK_P = _blocks(C, P)
    outs = []
    with device_guard(g):
        for lvl, (N, _, H, W) in enumerate(dims):
            if N * C * H * W == 0:
                outs.append(grad.new_zeros((N, C, H, W)))
                continue
            buf = torch.zeros((N, C, H, W), dtype=acc, device=g.device)
            if deterministic:
                _bwd_plane_kernel[(N, triton.cdiv(C, BLOCK_C))](
                    g, rois, levels, sc, buf, R, lvl, N, C, H, W, out_h, out_w, int(sampling_ratio),
                    ALIGNED=bool(aligned), ACC=ACC, BLOCK_C=BLOCK_C, num_warps=num_warps, num_stages=1,
                    enable_fp_fusion=False)
            else:
                _bwd_atomic_kernel[(R, triton.cdiv(C, BLOCK_C), triton.cdiv(P, BLOCK_P))](
                    g, rois, levels, sc, buf, lvl, N, C, H, W, out_h, out_w, int(sampling_ratio),
                    ALIGNED=bool(aligned), ACC=ACC, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
                    enable_fp_fusion=False)
            outs.append(buf.to(grad.dtype))
    return outs
