// CPU kernel of kdops::bckd_cls_loss_fwd (BCKD, Pan et al. ICCV 2023): loss and gradient in one
// pass over (N,H,W,J,K) strided views of the logits (dense_head.h), so no permute copy is made.
//
// Tasks are (n, h, j, run of kTile anchors along w). Row-wise paths keep every buffer in L1:
// for (N,C,H,W) maps a row is one class over the tile's anchors; for (A,K) a row is one
// anchor's classes. Other layouts gather the tile into class-major buffers. Each task owns one
// partial loss: results are bitwise reproducible whatever the thread count. The element-wise
// math is in bckd_cls_loss_kernel.h, compiled per instruction set (multi_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "dense_head.h"
#include "vec_math.h"

#define KDOPS_KERNEL "bckd_cls_loss_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

constexpr int64_t kTile = 256;  // anchors per task: long contiguous runs per class for (N,C,H,W) maps

// The BCKD terms of a row of logits (bckd_cls_loss_kernel.h, this CPU's version).
template <typename A>
void cls_block(int mode, const A* x, const A* t, int64_t n, A beta, A* l, A* g) {
  if (mode == 1) KDOPS_ISA_PICK(cls_terms<1, A>)(x, t, n, beta, l, g);
  else if (mode == 2) KDOPS_ISA_PICK(cls_terms<2, A>)(x, t, n, beta, l, g);
  else KDOPS_ISA_PICK(cls_terms<0, A>)(x, t, n, beta, l, g);
}

// cls_terms fused with the row's loss sum and the gradient's write (bckd_cls_loss_kernel.h).
template <typename A>
void cls_block_row(int mode, const A* x, const A* t, int64_t n, A beta, const A* f, A* row, A* out) {
  if (mode == 1) KDOPS_ISA_PICK(cls_row<1, A>)(x, t, n, beta, f, row, out);
  else if (mode == 2) KDOPS_ISA_PICK(cls_row<2, A>)(x, t, n, beta, f, row, out);
  else KDOPS_ISA_PICK(cls_row<0, A>)(x, t, n, beta, f, row, out);
}

// ------------------------------------------------------------------ classification
template <typename scalar_t>
void cls_cpu(const View5& vs, const View5& vt, const View5& vg, const scalar_t* sp, const scalar_t* tp,
             scalar_t* gp, const acc_t<scalar_t>* w, double beta, double scale, acc_t<scalar_t>* gw,
             std::vector<double>& part, int64_t chunks) {
  using A = acc_t<scalar_t>;
  const int mode = beta == 1.0 ? 1 : (beta == 2.0 ? 2 : 0);
  const int64_t K = vs.C;
  const bool anchor_rows = vs.sW == 1 && vt.sW == 1 && vg.sW == 1;
  const bool class_rows = !anchor_rows && vs.sC == 1 && vt.sC == 1 && vg.sC == 1;
  at::parallel_for(0, (int64_t)part.size(), 1, [&](int64_t begin, int64_t end) {
    const int64_t R = std::max(K, kTile);
    std::vector<A> xb(R), tb(R), lb(R), gb(R), row(kTile), f(kTile);
    std::vector<A> xs, ts, ls, gs;
    if (!anchor_rows && !class_rows) {
      xs.resize(K * kTile), ts.resize(K * kTile), ls.resize(K * kTile), gs.resize(K * kTile);
    }
    for (int64_t task = begin; task < end; ++task) {
      const Tile tl = tile_of(vs, task, chunks, kTile);
      const int64_t len = tl.len;
      for (int64_t i = 0; i < len; ++i) f[i] = A(scale) * (w ? w[anchor_of(vs, tl, i)] : A(1));
      std::fill(row.begin(), row.end(), A(0));
      if (anchor_rows) {
        const scalar_t* s0 = sp + vs.at(tl.n, tl.h, tl.w0, tl.j);
        const scalar_t* t0 = tp + vt.at(tl.n, tl.h, tl.w0, tl.j);
        scalar_t* g0 = gp ? gp + vg.at(tl.n, tl.h, tl.w0, tl.j) : nullptr;
        const int64_t es = sizeof(scalar_t);
        for (int64_t k = 0; k < K; ++k) {
          // the next class's rows, each in its own plane: a run of kTile anchors is too short for
          // the hardware prefetcher to pick up K*J interleaved streams on its own
          if (k + 2 < K) {
            const char* sn = reinterpret_cast<const char*>(s0 + (k + 2) * vs.sC);
            const char* tn = reinterpret_cast<const char*>(t0 + (k + 2) * vt.sC);
            char* gn = g0 ? reinterpret_cast<char*>(g0 + (k + 2) * vg.sC) : nullptr;
            for (int64_t o = 0; o < len * es; o += 64) {
              __builtin_prefetch(sn + o);
              __builtin_prefetch(tn + o);
              if (gn) __builtin_prefetch(gn + o, 1);
            }
          }
          if constexpr (std::is_same<scalar_t, A>::value) {
            if (g0) {  // float/double maps: one fused loop, the gradient written in place
              cls_block_row<A>(mode, s0 + k * vs.sC, t0 + k * vt.sC, len, A(beta), f.data(), row.data(),
                               g0 + k * vg.sC);
              continue;
            }
          }
          cls_block<A>(mode, widen(s0 + k * vs.sC, len, xb.data()), widen(t0 + k * vt.sC, len, tb.data()), len,
                       A(beta), lb.data(), gb.data());
          for (int64_t i = 0; i < len; ++i) row[i] += lb[i];
          if (g0) {
            scalar_t* gk = g0 + k * vg.sC;
            for (int64_t i = 0; i < len; ++i) gk[i] = scalar_t(f[i] * gb[i]);
          }
        }
      } else if (class_rows) {
        for (int64_t i = 0; i < len; ++i) {
          cls_block<A>(mode, widen(sp + vs.at(tl.n, tl.h, tl.w0 + i, tl.j), K, xb.data()),
                       widen(tp + vt.at(tl.n, tl.h, tl.w0 + i, tl.j), K, tb.data()), K, A(beta), lb.data(),
                       gb.data());
          A r = 0;
          for (int64_t k = 0; k < K; ++k) r += lb[k];
          row[i] = r;
          if (gp) {
            scalar_t* gi = gp + vg.at(tl.n, tl.h, tl.w0 + i, tl.j);
            for (int64_t k = 0; k < K; ++k) gi[k] = scalar_t(f[i] * gb[k]);
          }
        }
      } else {
        gather(sp, vs, tl, xs.data(), kTile);
        gather(tp, vt, tl, ts.data(), kTile);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = k * kTile;
          cls_block<A>(mode, xs.data() + o, ts.data() + o, len, A(beta), ls.data() + o, gs.data() + o);
          for (int64_t i = 0; i < len; ++i) row[i] += ls[o + i];
        }
        if (gp) scatter(gp, vg, tl, gs.data(), f.data(), kTile);
      }
      double task_loss = 0.0;
      for (int64_t i = 0; i < len; ++i) {
        const int64_t a = anchor_of(vs, tl, i);
        task_loss += double(w ? w[a] : A(1)) * double(row[i]);
        if (gw) gw[a] = A(scale) * row[i];
      }
      part[task] = task_loss;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bckd_cls_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& weight, double beta,
    double scale, bool grad_student, bool grad_weight) {
  TORCH_CHECK(student.dim() == 5 && student.sizes() == teacher.sizes(),
              "kdops::bckd_cls_loss_fwd: student and teacher must be (N,H,W,J,K) views of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kdops::bckd_cls_loss_fwd: one dtype expected");
  const auto acc_type = acc_dtype(student.scalar_type());
  const View5 v(student);
  const int64_t A_ = v.N * v.H * v.W * v.J;
  at::Tensor w;
  if (weight.has_value()) {
    w = weight->contiguous();
    TORCH_CHECK(w.scalar_type() == acc_type && w.numel() == A_, "kdops::bckd_cls_loss_fwd: weight must be (A,) acc dtype");
  }
  auto loss = at::empty({}, student.options().dtype(acc_type));
  auto g = grad_student ? at::empty_like(student) : no_grad_placeholder(student);
  auto gw = (grad_weight && w.defined()) ? at::empty({A_}, loss.options()) : no_grad_placeholder(loss);
  View5 vs(student), vt(teacher), vg(grad_student ? g : student);
  merge_all({&vs, &vt, &vg});
  const int64_t chunks = (vs.W + kTile - 1) / kTile;
  std::vector<double> part(A_ == 0 ? 0 : vs.N * vs.H * vs.J * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "bckd_cls_loss_fwd", [&] {
    using A = acc_t<scalar_t>;
    cls_cpu<scalar_t>(vs, vt, vg, student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
                      grad_student ? g.data_ptr<scalar_t>() : nullptr, w.defined() ? w.data_ptr<A>() : nullptr,
                      beta, scale, gw.numel() ? gw.data_ptr<A>() : nullptr, part, chunks);
  });
  loss.fill_(ordered_sum(part) * scale);
  return {loss, g, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("bckd_cls_loss_fwd", &bckd_cls_loss_fwd_cpu); }

}  // namespace kdops
