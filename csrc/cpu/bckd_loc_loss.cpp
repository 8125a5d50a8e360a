// CPU kernel of kdops::bckd_loc_loss_fwd (BCKD, Pan et al. ICCV 2023), every FPN level in one
// pool of tasks: per chunk of anchors, the largest classification score gap; per tile, student
// and teacher boxes decoded in tile buffers (box_coders.h), GIoU (or IoU) loss and its
// gradient back through the decoder to the student regression.
//
// Inputs are (N,H,W,J,C) strided views (dense_head.h). Float rows of anchor-contiguous maps
// (mmdet's (N,C,H,W)) are read and written in place: the GFL integral reads its bins straight
// from the input and the gradient is written straight into the output. Other layouts and
// fp16/bf16 go through class-major tile buffers (gather / put). Every per-anchor loop is a
// plain loop over tile buffers that GCC vectorises, in bckd_loc_loss_kernel.h, compiled per
// instruction set (multi_isa.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "box_coders.h"
#include "common.h"
#include "dense_head.h"
#include "vec_math.h"

namespace kdops {
namespace {

constexpr int64_t kLocTile = 256;    // anchors per decode tile: its buffers stay in L1/L2
constexpr int64_t kLocChunk = 1024;  // anchors per task: the gap pass streams this many per class

}  // namespace
}  // namespace kdops

#define KDOPS_KERNEL "bckd_loc_loss_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

struct LocArgs {
  int decoder, mode;
  int64_t R1, M, P;
  double means[4], stds[4], max_ratio, stride_value, scale;
};

// One FPN level: strided views of the head tensors (h,w merged where possible), data
// pointers (typed by the dispatch on `dtype`), its own priors, weight, per-anchor FPN strides and scale.
struct LocLevel {
  LocArgs a;
  View5 sr, tr, sl, tl, g;
  const void *srp = nullptr, *trp = nullptr, *slp = nullptr, *tlp = nullptr, *pri = nullptr, *w = nullptr,
             *st = nullptr;
  void *gp = nullptr, *gw = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t chunks = 0, tasks = 0;
};

// Per-thread tile buffers, sized for the largest level.
template <typename A>
struct LocWork {
  // Uninitialised (every element is written before it is read): no 0.3 MB memset per call.
  struct Buf {
    std::unique_ptr<A[]> p;
    void resize(int64_t n) { p.reset(n > 0 ? new A[n] : nullptr); }
    A* data() { return p.get(); }
    A& operator[](int64_t i) { return p[i]; }
  };
  Buf xb, tb, nb, db, rs, rt, gr, ev, ds, dt, inv, q, wh, bs, bt, gb, per, gap, gd, f;
  LocWork(int64_t K, int64_t D, bool gfl) {
    const int64_t KB = std::max(K, kLocChunk), T4 = 4 * kLocTile;
    for (auto* v : {&xb, &tb, &nb, &db}) v->resize(KB);
    for (auto* v : {&rs, &rt, &gr}) v->resize(D * kLocTile);
    ev.resize(gfl ? D * kLocTile : 0);
    for (auto* v : {&ds, &dt, &inv, &q, &wh, &bs, &bt, &gb}) v->resize(T4);
    for (auto* v : {&per, &f}) v->resize(kLocTile);
    for (auto* v : {&gap, &gd}) v->resize(kLocChunk);
  }
};

struct LocSlots {  // a thread's workspaces, made on first use
  std::unique_ptr<LocWork<float>> f;
  std::unique_ptr<LocWork<double>> d;
  std::unique_ptr<LocWork<float>>& get(float*) { return f; }
  std::unique_ptr<LocWork<double>>& get(double*) { return d; }
};

// One task: a chunk of up to kLocChunk anchors along a (merged) row of one level. Returns its
// partial loss (before the level's scale).
template <typename scalar_t>
double loc_task(const LocLevel& lv, int64_t task, LocWork<acc_t<scalar_t>>& wk) {
  using A = acc_t<scalar_t>;
  const LocArgs& a = lv.a;
  const View5 &vsr = lv.sr, &vtr = lv.tr, &vsl = lv.sl, &vtl = lv.tl, &vg = lv.g;
  const auto *srp = static_cast<const scalar_t*>(lv.srp), *trp = static_cast<const scalar_t*>(lv.trp),
             *slp = static_cast<const scalar_t*>(lv.slp), *tlp = static_cast<const scalar_t*>(lv.tlp);
  auto* gp = static_cast<scalar_t*>(lv.gp);
  const auto *pri = static_cast<const A*>(lv.pri), *w = static_cast<const A*>(lv.w), *st = static_cast<const A*>(lv.st);
  auto* gw = static_cast<A*>(lv.gw);
  const int64_t K = vsl.C, J = vsr.J;
  const bool gfl = a.decoder == kGfl;
  A ms[9];
  for (int c = 0; c < 4; ++c) {
    ms[c] = A(a.means[c]);
    ms[4 + c] = A(a.stds[c]);
  }
  ms[8] = A(a.max_ratio);
  A *gap = wk.gap.data(), *gd = wk.gd.data();
  const Tile big = tile_of(vsr, task, lv.chunks, kLocChunk);
  const int64_t c0 = anchor_of(vsr, big, 0);
  // gap over the whole chunk, row by row: long contiguous runs per class on (N,C,H,W) maps
  if (vsl.sW == 1 && vtl.sW == 1) {
    std::fill(gap, gap + big.len, A(0));  // running max numerators
    std::fill(gd, gd + big.len, A(1));    // and denominators
    const scalar_t* s0 = slp + vsl.at(big.n, big.h, big.w0, big.j);
    const scalar_t* t0 = tlp + vtl.at(big.n, big.h, big.w0, big.j);
    // the first tile's regression rows (in place) are fetched into L2 during this pass
    const scalar_t* r0s = vsr.sW == 1 ? srp + vsr.at(big.n, big.h, big.w0, big.j) : nullptr;
    const scalar_t* r0t = vtr.sW == 1 ? trp + vtr.at(big.n, big.h, big.w0, big.j) : nullptr;
    const int64_t rlen = std::min(kLocTile, big.len), D = vsr.C, es = sizeof(scalar_t);
    for (int64_t k = 0; k < K; ++k) {
      const bool more = k + 1 < K;
      KDOPS_ISA_PICK(gap_rows<A>)(widen(s0 + k * vsl.sC, big.len, wk.xb.data()),
                                  widen(t0 + k * vtl.sC, big.len, wk.tb.data()), big.len, gap, gd,
                                  more ? reinterpret_cast<const char*>(s0 + (k + 1) * vsl.sC) : nullptr,
                                  more ? reinterpret_cast<const char*>(t0 + (k + 1) * vtl.sC) : nullptr, es);
      const int64_t q0 = k * D / K, q1 = (k + 1) * D / K;
      if (r0s) prefetch_rows_l2(reinterpret_cast<const char*>(r0s), vsr.sC, es, q0, q1, rlen);
      if (r0t) prefetch_rows_l2(reinterpret_cast<const char*>(r0t), vtr.sC, es, q0, q1, rlen);
    }
    for (int64_t i = 0; i < big.len; ++i) gap[i] /= gd[i];
  } else {  // classes contiguous ((A,K)) or any other layout: one anchor's classes at a time
    for (int64_t i = 0; i < big.len; ++i) {
      const scalar_t* s0 = slp + vsl.at(big.n, big.h, big.w0 + i, big.j);
      const scalar_t* t0 = tlp + vtl.at(big.n, big.h, big.w0 + i, big.j);
      for (int64_t k = 0; k < K; ++k) {
        wk.xb[k] = A(s0[k * vsl.sC]);
        wk.tb[k] = A(t0[k * vtl.sC]);
      }
      KDOPS_ISA_PICK(gap_fracs<A>)(wk.xb.data(), wk.tb.data(), K, wk.nb.data(), wk.db.data());
      A N = 0, Dn = 1;
      for (int64_t k = 0; k < K; ++k) base::frac_max<A>(wk.nb[k], wk.db[k], N, Dn);  // a scalar fold
      gap[i] = N / Dn;
    }
  }
  double task_loss = 0.0;
  A *q = wk.q.data(), *ds = wk.ds.data(), *dt = wk.dt.data(), *bs = wk.bs.data(), *bt = wk.bt.data(),
    *gb = wk.gb.data(), *per = wk.per.data(), *f = wk.f.data(), *inv = wk.inv.data(), *wh = wk.wh.data();
  for (int64_t off = 0; off < big.len; off += kLocTile) {
    Tile t = big;
    t.w0 += off;
    t.len = std::min(kLocTile, big.len - off);
    const int64_t len = t.len, a0 = c0 + off * J;
    const A* gapt = gap + off;
    prior_rows<kLocTile>(a.decoder, pri, a.M, a.P, st, a.stride_value, a0, J, len, q);
    // student and teacher regression rows: in place, or gathered into class-major buffers
    const A* zs = rows_in_place<scalar_t, A>(srp, vsr, t);
    const A* zt = rows_in_place<scalar_t, A>(trp, vtr, t);
    const int64_t szs = zs ? vsr.sC : kLocTile, szt = zt ? vtr.sC : kLocTile;
    if (!zs) {
      gather(srp, vsr, t, wk.rs.data(), kLocTile);
      zs = wk.rs.data();
    }
    if (!zt) {
      gather(trp, vtr, t, wk.rt.data(), kLocTile);
      zt = wk.rt.data();
    }
    if (gfl) {
      // rows read in place: fetch the next tile's while this one is computed
      const bool next = off + kLocTile < big.len;
      const A* zsn = next && szs != kLocTile ? zs + kLocTile : nullptr;
      const A* ztn = next && szt != kLocTile ? zt + kLocTile : nullptr;
      KDOPS_ISA_PICK(integral_tile<A>)(zs, szs, a.R1, len, gp ? wk.ev.data() : (A*)nullptr, ds, inv, zsn);
      KDOPS_ISA_PICK(integral_tile<A>)(zt, szt, a.R1, len, (A*)nullptr, dt, inv, ztn);
      KDOPS_ISA_PICK(dist_boxes<A>)(ds, kLocTile, q, len, bs);
      KDOPS_ISA_PICK(dist_boxes<A>)(dt, kLocTile, q, len, bt);
    } else if (a.decoder == kDistance) {
      KDOPS_ISA_PICK(dist_boxes<A>)(zs, szs, q, len, bs);
      KDOPS_ISA_PICK(dist_boxes<A>)(zt, szt, q, len, bt);
    } else {
      KDOPS_ISA_PICK(delta_boxes<A>)(zs, szs, q, ms, len, wh, bs);
      KDOPS_ISA_PICK(delta_boxes<A>)(zt, szt, q, ms, len, ds, bt);  // ds: scratch
    }
    KDOPS_ISA_PICK(iou_block<A>)(a.mode, A(1e-6), bs, bt, len, per, gb);
    for (int64_t i = 0; i < len; ++i) {
      const A wa = gapt[i] * (w ? w[a0 + i * J] : A(1));
      task_loss += double(wa) * double(per[i]);
      if (gw) gw[a0 + i * J] = A(a.scale) * gapt[i] * per[i];
      f[i] = A(a.scale) * wa;
    }
    if (!gp) continue;
    // the gradient straight into the output (float, anchors contiguous) or via a buffer
    A* out = nullptr;
    if constexpr (std::is_same<scalar_t, A>::value) {
      if (vg.sW == 1) out = gp + vg.at(t.n, t.h, t.w0, t.j);
    }
    const int64_t so = out ? vg.sC : kLocTile;
    A* dst = out ? out : wk.gr.data();
    if (gfl) KDOPS_ISA_PICK(gfl_grad_tile<A>)(wk.ev.data(), ds, inv, gb, f, a.R1, len, dst, so);
    else KDOPS_ISA_PICK(box4_grad<A>)(a.decoder, gb, q, wh, ms, f, len, dst, so);
    if (!out) put(gp, vg, t, wk.gr.data(), kLocTile);
  }
  return task_loss;
}

// Every level in one pool of tasks (largest level first, so the small levels fill in behind
// it). Each task owns one partial; levels sum theirs in a fixed order (deterministic).
void loc_levels_cpu(const std::vector<LocLevel>& lv, int64_t K, int64_t D, std::vector<double>& part,
                    const std::vector<int64_t>& first) {
  const int64_t total = (int64_t)part.size();
  if (total == 0) return;
  const bool gfl = lv[0].a.decoder == kGfl;
  TaskPool(total).run([] { return LocSlots(); }, [&](LocSlots& slots, int64_t task) {
    size_t l = 0;
    while (l + 1 < lv.size() && first[l + 1] <= task) ++l;
    const LocLevel& L = lv[l];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.dtype, "bckd_loc_loss_fwd", [&] {
      using Acc = acc_t<scalar_t>;
      auto& slot = slots.get(static_cast<Acc*>(nullptr));
      if (!slot) slot = std::make_unique<LocWork<Acc>>(K, D, gfl);
      part[task] = loc_task<scalar_t>(L, task - first[l], *slot);
    });
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> bckd_loc_loss_fwd_cpu(
    at::TensorList student_reg, at::TensorList teacher_reg, at::TensorList student_logits,
    at::TensorList teacher_logits, at::TensorList priors, const c10::List<c10::optional<at::Tensor>>& weight,
    const c10::List<c10::optional<at::Tensor>>& stride, at::ArrayRef<double> stride_value, int64_t decoder,
    int64_t loss_mode, int64_t reg_max, at::ArrayRef<double> means, at::ArrayRef<double> stds, double max_ratio,
    at::ArrayRef<double> scale, bool grad_reg, bool grad_weight) {
  const int64_t L = (int64_t)student_reg.size();
  TORCH_CHECK(L > 0 && (int64_t)teacher_reg.size() == L && (int64_t)student_logits.size() == L &&
                  (int64_t)teacher_logits.size() == L && (int64_t)priors.size() == L && (int64_t)weight.size() == L &&
                  (int64_t)stride.size() == L && (int64_t)stride_value.size() == L && (int64_t)scale.size() == L,
              "kdops::bckd_loc_loss_fwd: every per-level argument needs one entry per level");
  TORCH_CHECK(decoder >= 0 && decoder <= 2 && reg_max >= 0 && means.size() == 4 && stds.size() == 4,
              "kdops::bckd_loc_loss_fwd: bad decoder arguments");
  const int64_t R1 = reg_max + 1;
  const int64_t D = decoder == kGfl ? 4 * R1 : 4;
  bool any_double = false;
  for (const auto& t : student_reg) any_double |= t.scalar_type() == at::kDouble;
  auto loss = at::empty({L}, student_reg[0].options().dtype(any_double ? at::kDouble : at::kFloat));
  std::vector<at::Tensor> grads, gws, keep;  // keep: converted priors / weights / FPN strides
  std::vector<LocLevel> lv(L);
  std::vector<int64_t> first(L + 1, 0);
  int64_t K = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor &sr = student_reg[l], &tr = teacher_reg[l], &sl = student_logits[l], &tl = teacher_logits[l];
    TORCH_CHECK((sr.dim() == 2 || sr.dim() == 4) && sr.sizes() == tr.sizes() && sr.scalar_type() == tr.scalar_type() &&
                    sl.sizes() == tl.sizes() && sl.scalar_type() == sr.scalar_type() &&
                    tl.scalar_type() == sr.scalar_type() && sl.dim() == sr.dim() && sr.size(1) % D == 0 &&
                    (sr.dim() == 4 || sr.size(1) == D),
                "kdops::bckd_loc_loss_fwd: level ", l, ": student/teacher regression (A,D) or (N,J*D,H,W) of one dtype "
                "with logits of the same layout expected");
    const int64_t J = sr.dim() == 4 ? sr.size(1) / D : 1;
    TORCH_CHECK(sr.dim() == 2 ? sl.size(0) == sr.size(0)
                              : (sl.size(0) == sr.size(0) && sl.size(2) == sr.size(2) && sl.size(3) == sr.size(3) &&
                                 J > 0 && sl.size(1) % J == 0),
                "kdops::bckd_loc_loss_fwd: level ", l, ": logits must cover the regression's anchors");
    LocLevel& v = lv[l];
    v.dtype = sr.scalar_type();
    const auto acc = acc_dtype(v.dtype);
    v.sr = View5::of_head(sr, J);
    v.tr = View5::of_head(tr, J);
    v.sl = View5::of_head(sl, J);
    v.tl = View5::of_head(tl, J);
    K = std::max(K, v.sl.C);
    const int64_t A_ = v.sr.N * v.sr.H * v.sr.W * v.sr.J;
    const auto pri = priors[l].to(acc).contiguous();
    TORCH_CHECK(pri.dim() == 2 && (pri.size(1) == 4 || (pri.size(1) == 2 && decoder != kDelta)) &&
                    (A_ == 0 || (pri.size(0) > 0 && A_ % pri.size(0) == 0)),
                "kdops::bckd_loc_loss_fwd: level ", l, ": priors must be (M,4) (or (M,2) points) with M dividing A");
    keep.push_back(pri);
    v.pri = pri.data_ptr();
    at::Tensor w, st, gw_acc;
    if (weight.get(l).has_value()) {
      w = weight.get(l)->to(acc).contiguous();
      TORCH_CHECK(w.numel() == A_, "kdops::bckd_loc_loss_fwd: level ", l, ": weight must hold A values");
      keep.push_back(w);
      v.w = w.data_ptr();
    }
    if (stride.get(l).has_value()) {
      st = stride.get(l)->to(acc).contiguous();
      TORCH_CHECK(st.numel() == A_, "kdops::bckd_loc_loss_fwd: level ", l, ": stride must hold A values");
      keep.push_back(st);
      v.st = st.data_ptr();
    }
    v.a = LocArgs{(int)decoder, (int)loss_mode, R1, std::max<int64_t>(pri.size(0), 1), pri.size(1), {}, {},
                  max_ratio, stride_value[l], scale[l]};
    for (int c = 0; c < 4; ++c) {
      v.a.means[c] = means[c];
      v.a.stds[c] = stds[c];
    }
    at::Tensor g = grad_reg ? at::empty_like(sr) : no_grad_placeholder(sr);
    v.g = grad_reg ? View5::of_head(g, J) : v.sr;
    v.gp = grad_reg && g.numel() ? g.data_ptr() : nullptr;
    grads.push_back(g);
    if (grad_weight && w.defined()) {
      gw_acc = at::empty({A_}, w.options());
      v.gw = gw_acc.data_ptr();
    }
    gws.push_back(gw_acc);
    v.srp = sr.data_ptr();
    v.trp = tr.data_ptr();
    v.slp = sl.data_ptr();
    v.tlp = tl.data_ptr();
    merge_all({&v.sr, &v.tr, &v.sl, &v.tl, &v.g});
    v.chunks = (v.sr.W + kLocChunk - 1) / kLocChunk;
    v.tasks = A_ == 0 ? 0 : v.sr.N * v.sr.H * v.sr.J * v.chunks;
    first[l + 1] = first[l] + v.tasks;
  }
  std::vector<double> part(first[L], 0.0);
  loc_levels_cpu(lv, K, D, part, first);
  for (int64_t l = 0; l < L; ++l) {
    double s = 0.0;
    for (int64_t t = first[l]; t < first[l + 1]; ++t) s += part[t];
    if (any_double) loss.data_ptr<double>()[l] = s * scale[l];
    else loss.data_ptr<float>()[l] = float(s * scale[l]);
    if (gws[l].defined()) {
      const at::Tensor wt = *weight.get(l);  // a copy: get() returns a temporary optional
      gws[l] = gws[l].view(wt.sizes()).to(wt.scalar_type());
    } else {
      gws[l] = no_grad_placeholder(loss);
    }
  }
  return {loss, grads, gws};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("bckd_loc_loss_fwd", &bckd_loc_loss_fwd_cpu); }

}  // namespace kdops
