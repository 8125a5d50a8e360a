// kdops::bckd_loc_fwd (CPU), included by bckd.cpp: per tile of anchors, the largest
// classification score gap, student and teacher boxes decoded in registers/tile buffers,
// GIoU (or IoU) loss and its gradient back through the decoder to the student regression.
#pragma once

namespace kdops {
namespace {

enum Decoder { kDistance = 0, kGfl = 1, kDelta = 2 };

// Loss 1 - GIoU (mode 0) or 1 - max(IoU, eps) (mode 1) of aligned boxes, as mmdet's
// bbox_overlaps(is_aligned=True, eps) + GIoULoss / IoULoss(linear) compute it, and its
// gradient in the student box (teacher detached). Ties of max/min split the gradient
// evenly and clamp passes none at its bounds, as PyTorch's autograd does.
template <typename A>
KDOPS_INLINE void iou_elem(int mode, A eps, const A* b, const A* B, A& per, A* gb) {
  const A x1 = b[0], y1 = b[kTile], x2 = b[2 * kTile], y2 = b[3 * kTile];
  const A X1 = B[0], Y1 = B[kTile], X2 = B[2 * kTile], Y2 = B[3 * kTile];
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
  gb[kTile] = gy1;
  gb[2 * kTile] = gx2;
  gb[3 * kTile] = gy2;
}

#define KD_IOU_BLOCK(A)                                                                      \
  KDOPS_SIMD_CLONES void iou_block(int mode, A eps, const A* b, const A* B, int64_t n, A* per, A* gb) { \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) iou_elem<A>(mode, eps, b + i, B + i, per[i], gb + i); \
  }
KD_IOU_BLOCK(float)
KD_IOU_BLOCK(double)

// GFL integral in place: z (4*(R+1) x kTile logits) -> softmax probabilities; dist = sum_b b p_b.
template <typename A>
void integral_tile(A* z, int64_t R1, int64_t len, A* dist) {
  for (int64_t s = 0; s < 4; ++s) {
    A* zs = z + s * R1 * kTile;
    A m[kTile];
    for (int64_t i = 0; i < len; ++i) m[i] = zs[i];
    for (int64_t b = 1; b < R1; ++b)
      for (int64_t i = 0; i < len; ++i) m[i] = std::max(m[i], zs[b * kTile + i]);
    for (int64_t b = 0; b < R1; ++b)
      for (int64_t i = 0; i < len; ++i) zs[b * kTile + i] -= m[i];
  }
  for (int64_t r = 0; r < 4 * R1; ++r) exp_block(z + r * kTile, len);
  for (int64_t s = 0; s < 4; ++s) {
    A* zs = z + s * R1 * kTile;
    A sum[kTile] = {}, ex[kTile] = {};
    for (int64_t b = 0; b < R1; ++b)
      for (int64_t i = 0; i < len; ++i) sum[i] += zs[b * kTile + i];
    for (int64_t b = 0; b < R1; ++b)
      for (int64_t i = 0; i < len; ++i) {
        zs[b * kTile + i] /= sum[i];
        ex[i] += zs[b * kTile + i] * A(b);
      }
    for (int64_t i = 0; i < len; ++i) dist[s * kTile + i] = ex[i];
  }
}

struct LocArgs {
  int decoder, mode;
  int64_t R1, M, P;
  double means[4], stds[4], max_ratio, stride_value, scale;
};

// reg: D x kTile raw regression (softmax probabilities after this call for GFL).
template <typename A>
void decode_tile(const LocArgs& a, A* reg, const A* pri, const A* st, const int64_t* anchors, int64_t len, A* dist,
                 A* box) {
  if (a.decoder == kGfl) integral_tile(reg, a.R1, len, dist);
  for (int64_t i = 0; i < len; ++i) {
    const A* p = pri + (anchors[i] % a.M) * a.P;
    if (a.decoder == kDelta) {
      const A dx = reg[i] * A(a.stds[0]) + A(a.means[0]), dy = reg[kTile + i] * A(a.stds[1]) + A(a.means[1]);
      A dw = reg[2 * kTile + i] * A(a.stds[2]) + A(a.means[2]);
      A dh = reg[3 * kTile + i] * A(a.stds[3]) + A(a.means[3]);
      const A mr = A(a.max_ratio);
      dw = std::min(std::max(dw, -mr), mr);
      dh = std::min(std::max(dh, -mr), mr);
      const A px = (p[0] + p[2]) * A(0.5), py = (p[1] + p[3]) * A(0.5);
      const A pw = p[2] - p[0], ph = p[3] - p[1];
      const A gx = px + pw * dx, gy = py + ph * dy;
      const A gw = pw * std::exp(dw), gh = ph * std::exp(dh);
      dist[i] = gw;  // kept for the backward pass
      dist[kTile + i] = gh;
      box[i] = gx - gw * A(0.5);
      box[kTile + i] = gy - gh * A(0.5);
      box[2 * kTile + i] = gx + gw * A(0.5);
      box[3 * kTile + i] = gy + gh * A(0.5);
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
      box[kTile + i] = py - d[kTile + i];
      box[2 * kTile + i] = px + d[2 * kTile + i];
      box[3 * kTile + i] = py + d[3 * kTile + i];
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
    std::vector<A> ls(K * kTile), lt(K * kTile), rs(D * kTile), rt(D * kTile), gr(D * kTile);
    std::vector<A> ds(4 * kTile), dt(4 * kTile), bs(4 * kTile), bt(4 * kTile), gb(4 * kTile), per(kTile),
        gap(kTile), f(kTile);
    std::vector<int64_t> anchors(kTile);
    for (int64_t task = begin; task < end; ++task) {
      const Tile t = tile_of(vsr, task, chunks);
      const int64_t len = t.len;
      for (int64_t i = 0; i < len; ++i) anchors[i] = anchor_of(vsr, t, i);
      gather(slp, vsl, t, ls.data());
      gather(tlp, vtl, t, lt.data());
      std::fill(gap.begin(), gap.end(), A(0));
      for (int64_t k = 0; k < K; ++k) {
        A* row = ls.data() + k * kTile;
        gap_block(row, lt.data() + k * kTile, len, row);
        for (int64_t i = 0; i < len; ++i) gap[i] = std::max(gap[i], row[i]);
      }
      gather(srp, vsr, t, rs.data());
      gather(trp, vtr, t, rt.data());
      decode_tile<A>(a, rs.data(), pri, st, anchors.data(), len, ds.data(), bs.data());
      decode_tile<A>(a, rt.data(), pri, st, anchors.data(), len, dt.data(), bt.data());
      iou_block(a.mode, A(1e-6), bs.data(), bt.data(), len, per.data(), gb.data());
      double task_loss = 0.0;
      for (int64_t i = 0; i < len; ++i) {
        const A wa = gap[i] * (w ? w[anchors[i]] : A(1));
        task_loss += double(wa) * double(per[i]);
        if (gw) gw[anchors[i]] = A(a.scale) * gap[i] * per[i];
        f[i] = A(a.scale) * wa;
      }
      part[task] = task_loss;
      if (!gp) continue;
      const A *g0 = gb.data(), *g1 = g0 + kTile, *g2 = g1 + kTile, *g3 = g2 + kTile;
      if (a.decoder == kDelta) {
        const A mr = A(a.max_ratio);
        for (int64_t i = 0; i < len; ++i) {
          const A dw = rs[2 * kTile + i] * A(a.stds[2]) + A(a.means[2]);
          const A dh = rs[3 * kTile + i] * A(a.stds[3]) + A(a.means[3]);
          const A* p = pri + (anchors[i] % a.M) * a.P;
          gr[i] = (g0[i] + g2[i]) * (p[2] - p[0]) * A(a.stds[0]);
          gr[kTile + i] = (g1[i] + g3[i]) * (p[3] - p[1]) * A(a.stds[1]);
          gr[2 * kTile + i] = (dw > -mr && dw < mr) ? A(0.5) * (g2[i] - g0[i]) * ds[i] * A(a.stds[2]) : A(0);
          gr[3 * kTile + i] = (dh > -mr && dh < mr) ? A(0.5) * (g3[i] - g1[i]) * ds[kTile + i] * A(a.stds[3]) : A(0);
        }
      } else if (a.decoder == kDistance) {
        for (int64_t i = 0; i < len; ++i) {
          gr[i] = -g0[i];
          gr[kTile + i] = -g1[i];
          gr[2 * kTile + i] = g2[i];
          gr[3 * kTile + i] = g3[i];
        }
      } else {  // GFL: d z_b = g_d p_b (b - d)
        const A* gs[4] = {g0, g1, g2, g3};
        for (int64_t s = 0; s < 4; ++s) {
          const A sign = s < 2 ? A(-1) : A(1);
          for (int64_t b = 0; b < a.R1; ++b) {
            const int64_t c = (s * a.R1 + b) * kTile;
            for (int64_t i = 0; i < len; ++i)
              gr[c + i] = sign * gs[s][i] * rs[c + i] * (A(b) - ds[s * kTile + i]);
          }
        }
      }
      scatter(gp, vg, t, gr.data(), f.data());
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
  const int64_t chunks = (vsr.W + kTile - 1) / kTile;
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
