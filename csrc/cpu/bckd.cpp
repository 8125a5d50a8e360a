// CPU kernels of kdops::bckd_cls_loss_fwd and kdops::bckd_loc_loss_fwd (BCKD, Pan et al. ICCV 2023).
//
// Inputs arrive as strided 5-D views (N,H,W,J,C): mmdet's (N,J*C,H,W) head outputs and
// flattened (A,C) tensors are both such views, so no permute copy is made. Work is split
// into tasks of (n, h, j, run of kTile anchors along w); a task gathers its tile into
// small class-major buffers (so the math loops are contiguous and vectorise whatever the
// layout), computes loss and gradient in one pass and scatters the gradient back with
// the input's strides. Each task owns one partial loss: results are bitwise reproducible
// whatever the thread count. Decoded boxes live only in the task's buffers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bckd_math.h"
#include "common.h"

namespace kdops {
namespace {

using namespace bckd;
constexpr int64_t kTile = 256;  // anchors per task: long contiguous runs per class for (N,C,H,W) maps

struct View5 {  // a (N,H,W,J,C) strided view
  int64_t N = 0, H = 0, W = 0, J = 0, C = 0, sN = 0, sH = 0, sW = 0, sJ = 0, sC = 0;
  View5() = default;
  explicit View5(const at::Tensor& t)
      : N(t.size(0)), H(t.size(1)), W(t.size(2)), J(t.size(3)), C(t.size(4)), sN(t.stride(0)),
        sH(t.stride(1)), sW(t.stride(2)), sJ(t.stride(3)), sC(t.stride(4)) {}
  // A dense-head tensor itself, without a view op: (A,C) -> (1,1,A,1,C); mmdet's (N,J*C,H,W)
  // -> (N,H,W,J,C), anchors ordered (n,h,w,j) as kdops.ops._common.anchor_view orders them.
  static View5 of_head(const at::Tensor& t, int64_t J) {
    View5 v;
    if (t.dim() == 2) {
      v.N = v.H = v.J = 1;
      v.W = t.size(0);
      v.C = t.size(1);
      v.sW = t.stride(0);
      v.sC = t.stride(1);
    } else {
      v.N = t.size(0);
      v.H = t.size(2);
      v.W = t.size(3);
      v.J = J;
      v.C = J > 0 ? t.size(1) / J : 0;
      v.sN = t.stride(0);
      v.sH = t.stride(2);
      v.sW = t.stride(3);
      v.sC = t.stride(1);
      v.sJ = v.C * t.stride(1);
    }
    return v;
  }
  int64_t at(int64_t n, int64_t h, int64_t w, int64_t j) const { return n * sN + h * sH + w * sW + j * sJ; }
  bool hw_mergeable() const { return H <= 1 || sH == W * sW; }
  void merge_hw() {  // (h, w) -> one run of H*W positions: longer tiles on (N,C,H,W) maps
    W *= H;
    H = 1;
    sH = 0;
  }
};

// Merges (h,w) of every view when all allow it, so tiles cover whole rows of H*W anchors.
inline void merge_all(std::initializer_list<View5*> views) {
  for (View5* v : views)
    if (!v->hw_mergeable()) return;
  for (View5* v : views) v->merge_hw();
}

// Task index -> (n, h, j, first w, tile length).
struct Tile {
  int64_t n, h, j, w0, len;
};
inline Tile tile_of(const View5& v, int64_t task, int64_t chunks, int64_t T = kTile) {
  Tile r;
  const int64_t c = task % chunks, row = task / chunks;
  r.j = row % v.J;
  r.h = (row / v.J) % v.H;
  r.n = row / (v.J * v.H);
  r.w0 = c * T;
  r.len = std::min(T, v.W - r.w0);
  return r;
}
inline int64_t anchor_of(const View5& v, const Tile& t, int64_t i) {
  return ((t.n * v.H + t.h) * v.W + t.w0 + i) * v.J + t.j;
}

// Rows of a (N,C,H,W) map start a new page each, where hardware prefetchers stop: ask for
// the next row while this one is processed.
template <typename T>
KDOPS_INLINE void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * int64_t(sizeof(T)); o += 64) __builtin_prefetch(c + o);
}

// Tile <-> class-major buffer buf[c * kTile + i]; contiguous fast paths for the two layouts
// that matter: anchors contiguous (mmdet's (N,C,H,W)) and classes contiguous ((A,K)).
template <typename scalar_t, typename A>
void gather(const scalar_t* p, const View5& v, const Tile& t, A* buf, int64_t T = kTile) {
  const scalar_t* b = p + v.at(t.n, t.h, t.w0, t.j);
  if (v.sW == 1) {
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* src = b + c * v.sC;
      if (c + 1 < v.C) prefetch_row(src + v.sC, t.len);
      A* dst = buf + c * T;
      for (int64_t i = 0; i < t.len; ++i) dst[i] = A(src[i]);
    }
  } else if (v.sC == 1) {
    for (int64_t i = 0; i < t.len; ++i) {
      const scalar_t* src = b + i * v.sW;
      for (int64_t c = 0; c < v.C; ++c) buf[c * T + i] = A(src[c]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t i = 0; i < t.len; ++i) buf[c * T + i] = A(b[c * v.sC + i * v.sW]);
  }
}

// out[tile] = f[i] * buf[c * T + i]
template <typename scalar_t, typename A>
void scatter(scalar_t* p, const View5& v, const Tile& t, const A* buf, const A* f, int64_t T = kTile) {
  scalar_t* b = p + v.at(t.n, t.h, t.w0, t.j);
  if (v.sW == 1) {
    for (int64_t c = 0; c < v.C; ++c) {
      scalar_t* dst = b + c * v.sC;
      const A* src = buf + c * T;
      for (int64_t i = 0; i < t.len; ++i) dst[i] = scalar_t(f[i] * src[i]);
    }
  } else if (v.sC == 1) {
    for (int64_t i = 0; i < t.len; ++i) {
      scalar_t* dst = b + i * v.sW;
      for (int64_t c = 0; c < v.C; ++c) dst[c] = scalar_t(f[i] * buf[c * T + i]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t i = 0; i < t.len; ++i) b[c * v.sC + i * v.sW] = scalar_t(f[i] * buf[c * T + i]);
  }
}

// ------------------------------------------------------------------ vectorised blocks
#define KD_CLS_BLOCK(MODE, A)                                                                   \
  KDOPS_SIMD_CLONES void cls_block##MODE(const A* x, const A* t, int64_t n, A beta, A* l, A* g) { \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) cls_elem<MODE, A>(x[i], t[i], beta, l[i], g[i]); \
  }
KD_CLS_BLOCK(0, float)
KD_CLS_BLOCK(1, float)
KD_CLS_BLOCK(2, float)
KD_CLS_BLOCK(0, double)
KD_CLS_BLOCK(1, double)
KD_CLS_BLOCK(2, double)

template <typename A>
void cls_block(int mode, const A* x, const A* t, int64_t n, A beta, A* l, A* g) {
  if (mode == 1) cls_block1(x, t, n, beta, l, g);
  else if (mode == 2) cls_block2(x, t, n, beta, l, g);
  else cls_block0(x, t, n, beta, l, g);
}

// ------------------------------------------------------------------ classification
template <typename scalar_t, typename A>
KDOPS_INLINE void load_row(const scalar_t* src, int64_t n, A* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = A(src[i]);
}

// A contiguous row in the accumulation type: the row itself when no conversion is needed.
template <typename scalar_t, typename A>
KDOPS_INLINE const A* row_of(const scalar_t* src, int64_t n, A* buf) {
  if constexpr (std::is_same<scalar_t, A>::value) {
    return src;
  } else {
    load_row(src, n, buf);
    return buf;
  }
}

// Row-wise paths keep every buffer in L1: for (N,C,H,W) maps a row is one class over the
// tile's anchors; for (A,K) a row is one anchor's classes. Other layouts use the tile gather.
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
      const Tile tl = tile_of(vs, task, chunks);
      const int64_t len = tl.len;
      for (int64_t i = 0; i < len; ++i) f[i] = A(scale) * (w ? w[anchor_of(vs, tl, i)] : A(1));
      std::fill(row.begin(), row.end(), A(0));
      if (anchor_rows) {
        const scalar_t* s0 = sp + vs.at(tl.n, tl.h, tl.w0, tl.j);
        const scalar_t* t0 = tp + vt.at(tl.n, tl.h, tl.w0, tl.j);
        scalar_t* g0 = gp ? gp + vg.at(tl.n, tl.h, tl.w0, tl.j) : nullptr;
        for (int64_t k = 0; k < K; ++k) {
          cls_block<A>(mode, row_of(s0 + k * vs.sC, len, xb.data()), row_of(t0 + k * vt.sC, len, tb.data()), len,
                       A(beta), lb.data(), gb.data());
          for (int64_t i = 0; i < len; ++i) row[i] += lb[i];
          if (g0) {
            scalar_t* gk = g0 + k * vg.sC;
            for (int64_t i = 0; i < len; ++i) gk[i] = scalar_t(f[i] * gb[i]);
          }
        }
      } else if (class_rows) {
        for (int64_t i = 0; i < len; ++i) {
          cls_block<A>(mode, row_of(sp + vs.at(tl.n, tl.h, tl.w0 + i, tl.j), K, xb.data()),
                       row_of(tp + vt.at(tl.n, tl.h, tl.w0 + i, tl.j), K, tb.data()), K, A(beta), lb.data(),
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
        gather(sp, vs, tl, xs.data());
        gather(tp, vt, tl, ts.data());
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = k * kTile;
          cls_block<A>(mode, xs.data() + o, ts.data() + o, len, A(beta), ls.data() + o, gs.data() + o);
          for (int64_t i = 0; i < len; ++i) row[i] += ls[o + i];
        }
        if (gp) scatter(gp, vg, tl, gs.data(), f.data());
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
}  // namespace kdops

#include "bckd_loc.h"

namespace kdops {
namespace {

#define KD_SCALE_BLOCK(A)                                                    \
  KDOPS_SIMD_CLONES void scale_block(A* p, int64_t n, A f) {                 \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) p[i] *= f;           \
  }
KD_SCALE_BLOCK(float)
KD_SCALE_BLOCK(double)

template <typename scalar_t>
void scale_span(scalar_t* p, int64_t n, acc_t<scalar_t> f) {
  if constexpr (std::is_same<scalar_t, acc_t<scalar_t>>::value) {
    scale_block(p, n, f);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = scalar_t(acc_t<scalar_t>(p[i]) * f);
  }
}

// grads[i] *= factors[i] in place, every tensor in one pool of 64K-element tasks (see TaskPool:
// no fork-join barrier, so a backward pass on a busy machine does not wait for a descheduled
// thread). Dense tensors are scaled through their storage span whatever their strides.
void scale_grads_cpu(at::TensorList grads, at::ArrayRef<double> factors) {
  TORCH_CHECK(grads.size() == factors.size(), "kdops::scale_grads_: one factor per tensor expected");
  constexpr int64_t kChunk = 1 << 16;
  std::vector<int64_t> tensor, start;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (factors[i] == 1.0 || g.numel() == 0) continue;
    if (!g.is_non_overlapping_and_dense()) {
      g.mul_(factors[i]);
      continue;
    }
    for (int64_t o = 0; o < g.numel(); o += kChunk) {
      tensor.push_back((int64_t)i);
      start.push_back(o);
    }
  }
  TaskPool((int64_t)tensor.size()).run([] { return 0; }, [&](int, int64_t t) {
    const at::Tensor& g = grads[tensor[t]];
    const int64_t o = start[t], n = std::min(kChunk, g.numel() - o);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scale_grads_", [&] {
      scale_span(g.data_ptr<scalar_t>() + o, n, acc_t<scalar_t>(factors[tensor[t]]));
    });
  });
}

}  // namespace
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("scale_grads_", &kdops::scale_grads_cpu);
  m.impl("bckd_cls_loss_fwd", &kdops::bckd_cls_loss_fwd_cpu);
  m.impl("bckd_loc_loss_fwd", &kdops::bckd_loc_loss_fwd_cpu);
}
