// Box coders and aligned (G)IoU of dense detection heads, with their gradients: mmdet's
// DistancePointBBoxCoder, GFL's Integral (softmax expectation over reg_max + 1 bins per side),
// DeltaXYWHBBoxCoder, and bbox_overlaps(is_aligned=True) + GIoULoss / IoULoss.
//
// Self-contained inline templates for any kernel (BCKD today; HEAD and UniKD decode boxes too).
// They work on columns of class-major tile buffers: a quantity with 4 (or 4 * (reg_max + 1))
// components per anchor is that many rows of stride T (the tile width, a compile-time constant),
// anchor i in column i, so every loop is a plain `omp simd` loop over a row. Regression inputs
// may also be read in place with their own row stride (sd, sr, sz). A kernel compiled per
// instruction set (multi_isa.h) inlines them into each of its versions.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "vec_math.h"

namespace kdops {

// Decoder ids of the ops' schemas (kdops/ops/bckd_loc_loss.py passes them).
enum Decoder { kDistance = 0, kGfl = 1, kDelta = 2 };

// ------------------------------------------------------------------ priors
// Per anchor of a tile (anchors a0, a0 + J, ...): the point (x, y) for the distance decoders
// (divided by the anchor's stride st[a], or by stride_value > 0 when st is null), or the
// prior's centre and size (cx, cy, w, h) for DeltaXYWH; rows of T in q. priors (M,P): anchors
// (P = 4) or points (P = 2), shared by the images: row = anchor mod M, kept as a running index
// (no division per anchor).
template <int64_t T, typename A>
void prior_rows(int decoder, const A* pri, int64_t M, int64_t P, const A* st, double stride_value, int64_t a0,
                int64_t J, int64_t len, A* q) {
  int64_t r = a0 % M;
  const int64_t step = J % M;
  const bool div = st || stride_value > 0;
  for (int64_t i = 0; i < len; ++i) {
    const A* p = pri + r * P;
    if (decoder == kDelta) {
      q[i] = (p[0] + p[2]) * A(0.5);
      q[T + i] = (p[1] + p[3]) * A(0.5);
      q[2 * T + i] = p[2] - p[0];
      q[3 * T + i] = p[3] - p[1];
    } else {
      A px = P == 2 ? p[0] : (p[2] + p[0]) / A(2);
      A py = P == 2 ? p[1] : (p[3] + p[1]) / A(2);
      if (div) {
        const A s = st ? st[a0 + i * J] : A(stride_value);
        px = px / s;
        py = py / s;
      }
      q[i] = px;
      q[T + i] = py;
    }
    r += step;
    if (r >= M) r -= M;
  }
}

// ------------------------------------------------------------------ distance
// Distance decoders: box = (x - d0, y - d1, x + d2, y + d3), d in rows of stride sd.
template <int64_t T, typename A>
KDOPS_INLINE void distance_decode(const A* d, int64_t sd, const A* q, int64_t len, A* box) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    box[i] = q[i] - d[i];
    box[T + i] = q[T + i] - d[sd + i];
    box[2 * T + i] = q[i] + d[2 * sd + i];
    box[3 * T + i] = q[T + i] + d[3 * sd + i];
  }
}

// ------------------------------------------------------------------ GFL integral
// GFL's Integral over the 4 sides of up to T anchors, bins read from rows z[(s*R1 + b) * sz + i]
// (the input itself or a gather buffer): dist = sum_b b softmax(z)_b. For the student it
// also keeps the unnormalised e_b = exp(z_b - max) (rows of T) and inv = 1 / sum_b e_b.
// zn (or null): the next tile's rows, fetched into L2 one row per row done here.
template <int64_t T, bool KEEP, typename A>
KDOPS_INLINE void gfl_integral(const A* z, int64_t sz, int64_t R1, int64_t len, A* e, A* dist, A* inv, const A* zn) {
  A m[T], sum[T], ex[T];
  for (int64_t s = 0; s < 4; ++s) {
    const A* zs = z + s * R1 * sz;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      m[i] = zs[i];
      sum[i] = 0;
      ex[i] = 0;
    }
    for (int64_t b = 1; b < R1; ++b) {
      const A* zb = zs + b * sz;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) m[i] = std::max(m[i], zb[i]);
    }
    for (int64_t b = 0; b < R1; ++b) {
      const A* zb = zs + b * sz;
      if (zn) prefetch_rows_l2(reinterpret_cast<const char*>(zn), sz, sizeof(A), s * R1 + b, s * R1 + b + 1, len);
      A* eb = KEEP ? e + (s * R1 + b) * T : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const A v = exp_nonpos(zb[i] - m[i]);
        if (KEEP) eb[i] = v;
        sum[i] += v;
        ex[i] += v * A(b);
      }
    }
    A* ds = dist + s * T;
    A* is = inv + s * T;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const A r = A(1) / sum[i];
      ds[i] = ex[i] * r;
      if (KEEP) is[i] = r;
    }
  }
}

// d z_b = g_d p_b (b - d), p_b = e_b / sum, times the anchor factor f, for the 4 sides,
// written to rows out[(s*R1 + b) * so + i] (the gradient itself or a buffer).
template <int64_t T, typename A>
KDOPS_INLINE void gfl_integral_grad(const A* e, const A* dist, const A* inv, const A* gb, const A* f, int64_t R1,
                                    int64_t len, A* out, int64_t so) {
  A c[T];
  for (int64_t s = 0; s < 4; ++s) {
    const A sign = s < 2 ? A(-1) : A(1);
    const A *gs = gb + s * T, *ds = dist + s * T, *is = inv + s * T;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) c[i] = sign * gs[i] * f[i] * is[i];
    for (int64_t b = 0; b < R1; ++b) {
      const A* eb = e + (s * R1 + b) * T;
      A* ob = out + (s * R1 + b) * so;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) ob[i] = c[i] * eb[i] * (A(b) - ds[i]);
    }
  }
}

// ------------------------------------------------------------------ DeltaXYWH
// mmdet's DeltaXYWHBBoxCoder.decode of rows r (stride sr) at priors q, ms = (means[4], stds[4],
// max_ratio); wh keeps (w, h) and whether dw, dh were inside the clamp (1 / 0) for the gradient.
template <int64_t T, typename A>
KDOPS_INLINE void delta_xywh_decode(const A* r, int64_t sr, const A* q, const A* ms, int64_t len, A* wh, A* box) {
  const A m0 = ms[0], m1 = ms[1], m2 = ms[2], m3 = ms[3], s0 = ms[4], s1 = ms[5], s2 = ms[6], s3 = ms[7], mr = ms[8];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const A dx = r[i] * s0 + m0, dy = r[sr + i] * s1 + m1;
    const A dwr = r[2 * sr + i] * s2 + m2, dhr = r[3 * sr + i] * s3 + m3;
    const A dw = std::min(std::max(dwr, -mr), mr), dh = std::min(std::max(dhr, -mr), mr);
    const A gx = q[i] + q[2 * T + i] * dx, gy = q[T + i] + q[3 * T + i] * dy;
    const A gw = q[2 * T + i] * exp_any(dw), gh = q[3 * T + i] * exp_any(dh);
    wh[i] = gw;
    wh[T + i] = gh;
    wh[2 * T + i] = (dwr > -mr && dwr < mr) ? A(1) : A(0);
    wh[3 * T + i] = (dhr > -mr && dhr < mr) ? A(1) : A(0);
    box[i] = gx - gw * A(0.5);
    box[T + i] = gy - gh * A(0.5);
    box[2 * T + i] = gx + gw * A(0.5);
    box[3 * T + i] = gy + gh * A(0.5);
  }
}

// Gradient of the 4 regression values (DeltaXYWH or distances) times the anchor factor f, from
// the box gradient gb, to rows out (stride so).
template <int64_t T, typename A>
KDOPS_INLINE void box_coder_grad(int dec, const A* gb, const A* q, const A* wh, const A* ms, const A* f, int64_t len,
                                 A* out, int64_t so) {
  const A *g0 = gb, *g1 = gb + T, *g2 = g1 + T, *g3 = g2 + T;
  if (dec == kDelta) {
    const A s0 = ms[4], s1 = ms[5], s2 = ms[6], s3 = ms[7];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      out[i] = f[i] * ((g0[i] + g2[i]) * q[2 * T + i] * s0);
      out[so + i] = f[i] * ((g1[i] + g3[i]) * q[3 * T + i] * s1);
      out[2 * so + i] = f[i] * (wh[2 * T + i] * (A(0.5) * (g2[i] - g0[i]) * wh[i] * s2));
      out[3 * so + i] = f[i] * (wh[3 * T + i] * (A(0.5) * (g3[i] - g1[i]) * wh[T + i] * s3));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      out[i] = -f[i] * g0[i];
      out[so + i] = -f[i] * g1[i];
      out[2 * so + i] = f[i] * g2[i];
      out[3 * so + i] = f[i] * g3[i];
    }
  }
}

// ------------------------------------------------------------------ aligned (G)IoU
// Boxes are 4 rows of stride T (x1, y1, x2, y2), one column per box.
// Loss 1 - GIoU (mode 0) or 1 - max(IoU, eps) (mode 1) of aligned boxes, as mmdet's
// bbox_overlaps(is_aligned=True, eps) + GIoULoss / IoULoss(linear) compute it, and its
// gradient in the student box (teacher detached). Ties of max/min split the gradient
// evenly and clamp passes none at its bounds, as PyTorch's autograd does.
template <int64_t T, typename A>
KDOPS_INLINE void aligned_iou_loss(int mode, A eps, const A* b, const A* B, A& per, A* gb) {
  const A x1 = b[0], y1 = b[T], x2 = b[2 * T], y2 = b[3 * T];
  const A X1 = B[0], Y1 = B[T], X2 = B[2 * T], Y2 = B[3 * T];
  const A w1 = x2 - x1, h1 = y2 - y1;
  const A area1 = w1 * h1, area2 = (X2 - X1) * (Y2 - Y1);
  const A ltx = std::max(x1, X1), lty = std::max(y1, Y1), rbx = std::min(x2, X2), rby = std::min(y2, Y2);
  const A iwr = rbx - ltx, ihr = rby - lty;
  const A iw = std::max(iwr, A(0)), ih = std::max(ihr, A(0));
  const A ov = iw * ih;
  const A ur = area1 + area2 - ov;
  const A u = std::max(ur, eps);
  const A iou = ov / u;
  A g_ov, g_u, g_e = 0, elx = 0, ely = 0, erx = 0, ery = 0, ew = 0, eh = 0, ewr = 0, ehr = 0, er = 0, e = 1;
  if (mode == 0) {
    elx = std::min(x1, X1);
    ely = std::min(y1, Y1);
    erx = std::max(x2, X2);
    ery = std::max(y2, Y2);
    ewr = erx - elx;
    ehr = ery - ely;
    ew = std::max(ewr, A(0));
    eh = std::max(ehr, A(0));
    er = ew * eh;
    e = std::max(er, eps);
    per = A(1) - (iou - (e - u) / e);
    g_ov = -A(1) / u;
    g_u = ov / (u * u) - A(1) / e;
    g_e = u / (e * e);
  } else {
    const A m = iou > eps ? A(1) : A(0);
    per = A(1) - std::max(iou, eps);
    g_ov = -m / u;
    g_u = m * ov / (u * u);
  }
  const A g_ur = g_u * share_max(ur, eps);
  const A g_ovt = g_ov - g_ur;
  const A g_iw = iwr > A(0) ? g_ovt * ih : A(0);
  const A g_ih = ihr > A(0) ? g_ovt * iw : A(0);
  A gx1 = -h1 * g_ur - share_max(x1, X1) * g_iw;
  A gx2 = h1 * g_ur + share_min(x2, X2) * g_iw;
  A gy1 = -w1 * g_ur - share_max(y1, Y1) * g_ih;
  A gy2 = w1 * g_ur + share_min(y2, Y2) * g_ih;
  if (mode == 0) {
    const A g_er = g_e * share_max(er, eps);
    const A g_ew = ewr > A(0) ? g_er * eh : A(0);
    const A g_eh = ehr > A(0) ? g_er * ew : A(0);
    gx1 -= share_min(x1, X1) * g_ew;
    gx2 += share_max(x2, X2) * g_ew;
    gy1 -= share_min(y1, Y1) * g_eh;
    gy2 += share_max(y2, Y2) * g_eh;
  }
  gb[0] = gx1;
  gb[T] = gy1;
  gb[2 * T] = gx2;
  gb[3 * T] = gy2;
}

}  // namespace kdops
