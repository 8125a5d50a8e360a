// kdops::bckd_loc_fwd (CPU), included by bckd.cpp: per tile of anchors, the largest
// classification score gap, student and teacher boxes decoded in registers/tile buffers,
// GIoU (or IoU) loss and its gradient back through the decoder to the student regression.
#pragma once

namespace kdops {
namespace {

enum Decoder { kDistance = 0, kGfl = 1, kDelta = 2 };
constexpr int64_t kLocTile = 256;
constexpr int64_t kLocChunk = 1024;  // anchors per task (the gap pass streams this many per class)  // anchors per task: all of a tile's buffers stay in L1/L2

// Loss 1 - GIoU (mode 0) or 1 - max(IoU, eps) (mode 1) of aligned boxes, as mmdet's
// bbox_overlaps(is_aligned=True, eps) + GIoULoss / IoULoss(linear) compute it, and its
// gradient in the student box (teacher detached). Ties of max/min split the gradient
// evenly and clamp passes none at its bounds, as PyTorch's autograd does.
template <typename A>
KDOPS_INLINE void iou_elem(int mode, A eps, const A* b, const A* B, A& per, A* gb) {
  const A x1 = b[0], y1 = b[kLocTile], x2 = b[2 * kLocTile], y2 = b[3 * kLocTile];
  const A X1 = B[0], Y1 = B[kLocTile], X2 = B[2 * kLocTile], Y2 = B[3 * kLocTile];
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
  gb[kLocTile] = gy1;
  gb[2 * kLocTile] = gx2;
  gb[3 * kLocTile] = gy2;
}

#define KD_IOU_BLOCK(A)                                                                      \
  KDOPS_SIMD_CLONES void iou_block(int mode, A eps, const A* b, const A* B, int64_t n, A* per, A* gb) { \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) iou_elem<A>(mode, eps, b + i, B + i, per[i], gb + i); \
  }
KD_IOU_BLOCK(float)
KD_IOU_BLOCK(double)

// GFL integral in place: z (4*(R+1) x kLocTile logits) -> softmax probabilities; dist = sum_b b p_b.
template <typename A>
KDOPS_INLINE void integral_impl(A* z, int64_t R1, int64_t len, A* dist, bool want_p) {
  A m[kLocTile], sum[kLocTile], ex[kLocTile];
  for (int64_t s = 0; s < 4; ++s) {
    A* zs = z + s * R1 * kLocTile;
    for (int64_t i = 0; i < len; ++i) {
      m[i] = zs[i];
      sum[i] = 0;
      ex[i] = 0;
    }
    for (int64_t b = 1; b < R1; ++b)
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) m[i] = std::max(m[i], zs[b * kLocTile + i]);
    for (int64_t b = 0; b < R1; ++b) {
      A* zb = zs + b * kLocTile;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const A e = exp_nonpos(zb[i] - m[i]);
        zb[i] = e;
        sum[i] += e;
        ex[i] += e * A(b);
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      m[i] = A(1) / sum[i];  // reused as 1/sum
      dist[s * kLocTile + i] = ex[i] * m[i];
    }
    if (!want_p) continue;  // the teacher's probabilities are never needed
    for (int64_t b = 0; b < R1; ++b)
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) zs[b * kLocTile + i] *= m[i];
  }
}
KDOPS_SIMD_CLONES void integral_tile(float* z, int64_t R1, int64_t len, float* dist, bool want_p) {
  integral_impl(z, R1, len, dist, want_p);
}
KDOPS_SIMD_CLONES void integral_tile(double* z, int64_t R1, int64_t len, double* dist, bool want_p) {
  integral_impl(z, R1, len, dist, want_p);
}

// d z_b = g_d p_b (b - d) for the 4 sides; p (probabilities) in z's layout.
template <typename A>
KDOPS_INLINE void gfl_grad_impl(const A* p, const A* dist, const A* gb, int64_t R1, int64_t len, A* gr) {
  for (int64_t s = 0; s < 4; ++s) {
    const A sign = s < 2 ? A(-1) : A(1);
    const A* gs = gb + s * kLocTile;
    const A* ds = dist + s * kLocTile;
    for (int64_t b = 0; b < R1; ++b) {
      const int64_t c = (s * R1 + b) * kLocTile;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) gr[c + i] = sign * gs[i] * p[c + i] * (A(b) - ds[i]);
    }
  }
}
KDOPS_SIMD_CLONES void gfl_grad_tile(const float* p, const float* d, const float* g, int64_t R1, int64_t n, float* gr) {
  gfl_grad_impl(p, d, g, R1, n, gr);
}
KDOPS_SIMD_CLONES void gfl_grad_tile(const double* p, const double* d, const double* g, int64_t R1, int64_t n,
                                     double* gr) {
  gfl_grad_impl(p, d, g, R1, n, gr);
}

struct LocArgs {
  int decoder, mode;
  int64_t R1, M, P;
  double means[4], stds[4], max_ratio, stride_value, scale;
};

// reg: D x kLocTile raw regression (softmax probabilities after this call for GFL).
template <typename A>
void decode_tile(const LocArgs& a, A* reg, const A* pri, const A* st, const int64_t* anchors, int64_t len, A* dist,
                 A* box, bool want_p) {
  if (a.decoder == kGfl) integral_tile(reg, a.R1, len, dist, want_p);
  for (int64_t i = 0; i < len; ++i) {
    const A* p = pri + (anchors[i] % a.M) * a.P;
    if (a.decoder == kDelta) {
      const A dx = reg[i] * A(a.stds[0]) + A(a.means[0]), dy = reg[kLocTile + i] * A(a.stds[1]) + A(a.means[1]);
      A dw = reg[2 * kLocTile + i] * A(a.stds[2]) + A(a.means[2]);
      A dh = reg[3 * kLocTile + i] * A(a.stds[3]) + A(a.means[3]);
      const A mr = A(a.max_ratio);
      dw = std::min(std::max(dw, -mr), mr);
      dh = std::min(std::max(dh, -mr), mr);
      const A px = (p[0] + p[2]) * A(0.5), py = (p[1] + p[3]) * A(0.5);
      const A pw = p[2] - p[0], ph = p[3] - p[1];
      const A gx = px + pw * dx, gy = py + ph * dy;
      const A gw = pw * std::exp(dw), gh = ph * std::exp(dh);
      dist[i] = gw;  // kept for the backward pass
      dist[kLocTile + i] = gh;
      box[i] = gx - gw * A(0.5);
      box[kLocTile + i] = gy - gh * A(0.5);
      box[2 * kLocTile + i] = gx + gw * A(0.5);
      box[3 * kLocTile + i] = gy + gh * A(0.5);
    } else {
      A px = a.P == 2 ? p[0] : (p[2] + p[0]) / A(2);
      A py = a.P == 2 ? p[1] : (p[3] + p[1]) / A(2);
      const A s = st ? st[anchors[i]] : A(a.stride_value);
      if (st || a.stride_value > 0) {
        px = px / s;
        py = py / s;
      }
      const A* d = a.decoder == kGfl ? dist : reg;
      box[i] = px - d[i];
      box[kLocTile + i] = py - d[kLocTile + i];
      box[2 * kLocTile + i] = px + d[2 * kLocTile + i];
      box[3 * kLocTile + i] = py + d[3 * kLocTile + i];
    }
  }
}

template <typename scalar_t>
void loc_cpu(const LocArgs& a, const View5& vsr, const View5& vtr, const View5& vsl, const View5& vtl,
             const View5& vg, const scalar_t* srp, const scalar_t* trp, const scalar_t* slp, const scalar_t* tlp,
             scalar_t* gp, const acc_t<scalar_t>* pri, const acc_t<scalar_t>* w, const acc_t<scalar_t>* st,
             acc_t<scalar_t>* gw, std::vector<double>& part, int64_t chunks) {
  using A = acc_t<scalar_t>;
  const int64_t K = vsl.C, D = vsr.C;
  at::parallel_for(0, (int64_t)part.size(), 1, [&](int64_t begin, int64_t end) {
    const bool anchor_rows = vsl.sW == 1 && vtl.sW == 1;
    std::vector<A> xb(std::max(K, kLocChunk)), tb(std::max(K, kLocChunk));
    std::vector<A> rs(D * kLocTile), rt(D * kLocTile), gr(D * kLocTile);
    std::vector<A> ds(4 * kLocTile), dt(4 * kLocTile), bs(4 * kLocTile), bt(4 * kLocTile), gb(4 * kLocTile), per(kLocTile),
        gap(kLocChunk), f(kLocTile);
    std::vector<int64_t> anchors(kLocTile);
    for (int64_t task = begin; task < end; ++task) {
      const Tile big = tile_of(vsr, task, chunks, kLocChunk);
      // gap over the whole chunk, row by row: long contiguous runs per class on (N,C,H,W) maps
      std::fill(gap.begin(), gap.end(), A(0));
      if (anchor_rows) {
        const scalar_t* s0 = slp + vsl.at(big.n, big.h, big.w0, big.j);
        const scalar_t* t0 = tlp + vtl.at(big.n, big.h, big.w0, big.j);
        for (int64_t k = 0; k < K; ++k) {
          if (k + 1 < K) {
            prefetch_row(s0 + (k + 1) * vsl.sC, big.len);
            prefetch_row(t0 + (k + 1) * vtl.sC, big.len);
          }
          gap_block(row_of(s0 + k * vsl.sC, big.len, xb.data()), row_of(t0 + k * vtl.sC, big.len, tb.data()), big.len,
                    xb.data());
          for (int64_t i = 0; i < big.len; ++i) gap[i] = std::max(gap[i], xb[i]);
        }
      } else {  // classes contiguous ((A,K)) or any other layout: one anchor's classes at a time
        for (int64_t i = 0; i < big.len; ++i) {
          const scalar_t* s0 = slp + vsl.at(big.n, big.h, big.w0 + i, big.j);
          const scalar_t* t0 = tlp + vtl.at(big.n, big.h, big.w0 + i, big.j);
          for (int64_t k = 0; k < K; ++k) {
            xb[k] = A(s0[k * vsl.sC]);
            tb[k] = A(t0[k * vtl.sC]);
          }
          gap_block(xb.data(), tb.data(), K, xb.data());
          A mx = 0;
          for (int64_t k = 0; k < K; ++k) mx = std::max(mx, xb[k]);
          gap[i] = mx;
        }
      }
      double task_loss = 0.0;
      for (int64_t off = 0; off < big.len; off += kLocTile) {
        Tile t = big;
        t.w0 += off;
        t.len = std::min(kLocTile, big.len - off);
        const int64_t len = t.len;
        const A* gapt = gap.data() + off;
        for (int64_t i = 0; i < len; ++i) anchors[i] = anchor_of(vsr, t, i);
        gather(srp, vsr, t, rs.data(), kLocTile);
        gather(trp, vtr, t, rt.data(), kLocTile);
        decode_tile<A>(a, rs.data(), pri, st, anchors.data(), len, ds.data(), bs.data(), gp != nullptr);
        decode_tile<A>(a, rt.data(), pri, st, anchors.data(), len, dt.data(), bt.data(), false);
        iou_block(a.mode, A(1e-6), bs.data(), bt.data(), len, per.data(), gb.data());
        for (int64_t i = 0; i < len; ++i) {
          const A wa = gapt[i] * (w ? w[anchors[i]] : A(1));
          task_loss += double(wa) * double(per[i]);
          if (gw) gw[anchors[i]] = A(a.scale) * gapt[i] * per[i];
          f[i] = A(a.scale) * wa;
        }
        if (!gp) continue;
        const A *g0 = gb.data(), *g1 = g0 + kLocTile, *g2 = g1 + kLocTile, *g3 = g2 + kLocTile;
        if (a.decoder == kDelta) {
          const A mr = A(a.max_ratio);
          for (int64_t i = 0; i < len; ++i) {
            const A dw = rs[2 * kLocTile + i] * A(a.stds[2]) + A(a.means[2]);
            const A dh = rs[3 * kLocTile + i] * A(a.stds[3]) + A(a.means[3]);
            const A* p = pri + (anchors[i] % a.M) * a.P;
            gr[i] = (g0[i] + g2[i]) * (p[2] - p[0]) * A(a.stds[0]);
            gr[kLocTile + i] = (g1[i] + g3[i]) * (p[3] - p[1]) * A(a.stds[1]);
            gr[2 * kLocTile + i] = (dw > -mr && dw < mr) ? A(0.5) * (g2[i] - g0[i]) * ds[i] * A(a.stds[2]) : A(0);
            gr[3 * kLocTile + i] = (dh > -mr && dh < mr) ? A(0.5) * (g3[i] - g1[i]) * ds[kLocTile + i] * A(a.stds[3]) : A(0);
          }
        } else if (a.decoder == kDistance) {
          for (int64_t i = 0; i < len; ++i) {
            gr[i] = -g0[i];
            gr[kLocTile + i] = -g1[i];
            gr[2 * kLocTile + i] = g2[i];
            gr[3 * kLocTile + i] = g3[i];
          }
        } else {
          gfl_grad_tile(rs.data(), ds.data(), gb.data(), a.R1, len, gr.data());
        }
        scatter(gp, vg, t, gr.data(), f.data(), kLocTile);
      }
      part[task] = task_loss;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bckd_loc_fwd_cpu(
    const at::Tensor& student_reg, const at::Tensor& teacher_reg, const at::Tensor& student_logits,
    const at::Tensor& teacher_logits, const at::Tensor& priors, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& stride, double stride_value, int64_t decoder, int64_t loss_mode,
    int64_t reg_max, at::ArrayRef<double> means, at::ArrayRef<double> stds, double max_ratio, double scale,
    bool grad_reg, bool grad_weight) {
  TORCH_CHECK(student_reg.dim() == 5 && student_reg.sizes() == teacher_reg.sizes(),
              "kdops::bckd_loc_fwd: student_reg and teacher_reg must be (N,H,W,J,D) views of one shape");
  TORCH_CHECK(student_logits.dim() == 5 && student_logits.sizes() == teacher_logits.sizes(),
              "kdops::bckd_loc_fwd: logits must be (N,H,W,J,K) views of one shape");
  for (int64_t d = 0; d < 4; ++d)
    TORCH_CHECK(student_logits.size(d) == student_reg.size(d), "kdops::bckd_loc_fwd: anchor grids differ");
  const int64_t R1 = reg_max + 1;
  const int64_t D = decoder == kGfl ? 4 * R1 : 4;
  TORCH_CHECK(student_reg.size(4) == D && decoder >= 0 && decoder <= 2 && means.size() == 4 && stds.size() == 4,
              "kdops::bckd_loc_fwd: bad decoder arguments");
  const auto acc_type = acc_dtype(student_reg.scalar_type());
  const View5 v(student_reg);
  const int64_t A_ = v.N * v.H * v.W * v.J;
  const auto pri = priors.contiguous();
  TORCH_CHECK(pri.dim() == 2 && pri.scalar_type() == acc_type && (pri.size(1) == 4 || (pri.size(1) == 2 && decoder != kDelta)),
              "kdops::bckd_loc_fwd: priors must be (M,4) (or (M,2) points) in the acc dtype");
  TORCH_CHECK(A_ == 0 || (pri.size(0) > 0 && A_ % pri.size(0) == 0), "kdops::bckd_loc_fwd: priors rows must divide A");
  at::Tensor w, st;
  if (weight.has_value()) {
    w = weight->contiguous();
    TORCH_CHECK(w.scalar_type() == acc_type && w.numel() == A_, "kdops::bckd_loc_fwd: weight must be (A,)");
  }
  if (stride.has_value()) {
    st = stride->contiguous();
    TORCH_CHECK(st.scalar_type() == acc_type && st.numel() == A_, "kdops::bckd_loc_fwd: stride must be (A,)");
  }
  LocArgs a{(int)decoder, (int)loss_mode, R1, std::max<int64_t>(pri.size(0), 1), pri.size(1), {}, {}, max_ratio,
            stride_value, scale};
  for (int c = 0; c < 4; ++c) {
    a.means[c] = means[c];
    a.stds[c] = stds[c];
  }
  auto loss = at::empty({}, student_reg.options().dtype(acc_type));
  auto g = grad_reg ? at::empty_like(student_reg) : no_grad_placeholder(student_reg);
  auto gw = (grad_weight && w.defined()) ? at::empty({A_}, loss.options()) : no_grad_placeholder(loss);
  View5 vsr(student_reg), vtr(teacher_reg), vsl(student_logits), vtl(teacher_logits), vg(grad_reg ? g : student_reg);
  merge_all({&vsr, &vtr, &vsl, &vtl, &vg});
  const int64_t chunks = (vsr.W + kLocChunk - 1) / kLocChunk;
  std::vector<double> part(A_ == 0 ? 0 : vsr.N * vsr.H * vsr.J * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student_reg.scalar_type(), "bckd_loc_fwd", [&] {
    using Acc = acc_t<scalar_t>;
    loc_cpu<scalar_t>(a, vsr, vtr, vsl, vtl, vg, student_reg.data_ptr<scalar_t>(), teacher_reg.data_ptr<scalar_t>(),
                      student_logits.data_ptr<scalar_t>(), teacher_logits.data_ptr<scalar_t>(),
                      grad_reg ? g.data_ptr<scalar_t>() : nullptr, pri.data_ptr<Acc>(),
                      w.defined() ? w.data_ptr<Acc>() : nullptr, st.defined() ? st.data_ptr<Acc>() : nullptr,
                      gw.numel() ? gw.data_ptr<Acc>() : nullptr, part, chunks);
  });
  loss.fill_(ordered_sum(part) * scale);
  return {loss, g, gw};
}

}  // namespace
}  // namespace kdops
