// Vectorised loops of bckd_cls_loss, compiled once per instruction set: bckd_cls_loss.cpp
// includes this file through multi_isa.h (no include guard on purpose).
#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace kdops {
namespace KDOPS_ISA {

// BCKD classification term and its derivative in the student logit x, teacher logit t:
//   f = BCE(x, p) * |p - q|^beta,  p = sigmoid(t), q = sigmoid(x)
//   df/dx = (q - p) |d|^beta - BCE * beta |d|^(beta-1) sign(d) q (1 - q),  d = p - q
// MODE 1: beta = 1, MODE 2: beta = 2, MODE 0: any beta > 0 (0 where d = 0).
template <int MODE, typename T>
KDOPS_INLINE void cls_elem(T x, T t, T beta, T& loss, T& grad) {
  const T ex = exp_nonpos(-std::fabs(x));
  const T et = exp_nonpos(-std::fabs(t));
  // one division for sigmoid(x), sigmoid(t) and log1p's e/(2+e): r = 1/((1+ex)(1+et)(2+ex))
  const T dx = T(1) + ex, dt = T(1) + et, d2 = T(2) + ex;
  const T r = T(1) / (dx * dt * d2);
  const T q = (x >= T(0) ? T(1) : ex) * dt * d2 * r;
  const T p = (t >= T(0) ? T(1) : et) * dx * d2 * r;
  const T bce = (T(1) - p) * x + (x < T(0) ? -x : T(0)) + log1p_pair(ex, ex * dx * dt * r);
  const T d = x == t ? T(0) : p - q;  // exact 0 on ties (bf16 logits tie often), whatever FMA contraction does
  const T ad = std::fabs(d);
  const T sgn = T(d > T(0)) - T(d < T(0));
  const T qq = q * (T(1) - q);
  T g, dg;
  if (MODE == 1) {
    g = ad;
    dg = -sgn * qq;
  } else if (MODE == 2) {
    g = d * d;
    dg = T(-2) * d * qq;
  } else {
    g = std::pow(ad, beta);
    dg = ad > T(0) ? -beta * std::pow(ad, beta - T(1)) * sgn * qq : T(0);
  }
  loss = bce * g;
  grad = (q - p) * g + bce * dg;
}

// Loss terms l and gradients g of n (student, teacher) logit pairs.
template <int MODE, typename A>
void cls_terms(const A* x, const A* t, int64_t n, A beta, A* l, A* g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) cls_elem<MODE, A>(x[i], t[i], beta, l[i], g[i]);
}

// One class row of n anchors with every per-element step fused (float/double maps read and
// written in place): row[i] += the loss term, out[i] = f[i] * its gradient.
template <int MODE, typename A>
void cls_row(const A* x, const A* t, int64_t n, A beta, const A* f, A* row, A* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    A l, g;
    cls_elem<MODE, A>(x[i], t[i], beta, l, g);
    row[i] += l;
    out[i] = f[i] * g;
  }
}

}  // namespace KDOPS_ISA
}  // namespace kdops
