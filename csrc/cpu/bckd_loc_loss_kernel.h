// Vectorised loops of bckd_loc_loss, compiled once per instruction set: bckd_loc_loss.cpp
// includes this file through multi_isa.h (no include guard on purpose). kLocTile (the width
// of the tile buffers) comes from bckd_loc_loss.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "box_coders.h"
#include "vec_math.h"

namespace kdops {
namespace KDOPS_ISA {

// ------------------------------------------------------------------ score gap
// |sigmoid(t) - sigmoid(x)| as a fraction n / d (n = 0 exactly on ties, whatever FMA
// contraction does), so that the max over classes takes no division per class: the running
// max N / D is updated by cross-multiplying (all terms are positive and bounded).
template <typename A>
KDOPS_INLINE void gap_frac(A x, A t, A& n, A& d) {
  // sigma(x) = a / (1 + e), e = exp(-|x|), a = 1 (x >= 0) or e (x < 0): with the signs of x
  // and t alike the numerator is |e_t - e_x| (0 on ties), else 1 - e_x e_t.
  const A ex = exp_nonpos(-std::fabs(x)), et = exp_nonpos(-std::fabs(t));
  const bool same = (x >= A(0)) == (t >= A(0));
  n = same ? std::fabs(et - ex) : A(1) - ex * et;
  d = (A(1) + ex) * (A(1) + et);
}
template <typename A>
KDOPS_INLINE void frac_max(A n, A d, A& N, A& D) {
  const bool gt = n * D > N * d;
  N = gt ? n : N;
  D = gt ? d : D;
}

// One class row over n anchors folded into the running maxima N[i] / D[i]. xn / tn (or null):
// the next rows (es bytes per value), fetched a few lines per block of this one so that the
// requests stay spread out instead of filling the line-fill buffers in one burst.
template <typename A>
void gap_rows(const A* x, const A* t, int64_t n, A* N, A* D, const char* xn, const char* tn, int64_t es) {
  constexpr int64_t B = 256 / sizeof(A);
  for (int64_t b0 = 0; b0 < n; b0 += B) {
    const int64_t b1 = std::min(n, b0 + B);
    if (xn)
      for (int64_t o = b0 * es; o < b1 * es; o += 64) {
        __builtin_prefetch(xn + o);
        __builtin_prefetch(tn + o);
      }
#pragma omp simd
    for (int64_t i = b0; i < b1; ++i) {
      A a, b, Ni = N[i], Di = D[i];  // blend and store always: no branch on the mask
      gap_frac<A>(x[i], t[i], a, b);
      frac_max<A>(a, b, Ni, Di);
      N[i] = Ni;
      D[i] = Di;
    }
  }
}

// The fractions of n classes of one anchor (folded afterwards in class order).
template <typename A>
void gap_fracs(const A* x, const A* t, int64_t n, A* nn, A* dd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gap_frac<A>(x[i], t[i], nn[i], dd[i]);
}

// ------------------------------------------------------------------ box coders, per tile
template <typename A>
void iou_block(int mode, A eps, const A* b, const A* B, int64_t n, A* per, A* gb) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) aligned_iou_loss<kLocTile, A>(mode, eps, b + i, B + i, per[i], gb + i);
}

template <typename A>
void integral_tile(const A* z, int64_t sz, int64_t R1, int64_t len, A* e, A* dist, A* inv, const A* zn) {
  if (e) gfl_integral<kLocTile, true>(z, sz, R1, len, e, dist, inv, zn);
  else gfl_integral<kLocTile, false>(z, sz, R1, len, e, dist, inv, zn);
}

template <typename A>
void gfl_grad_tile(const A* e, const A* d, const A* inv, const A* gb, const A* f, int64_t R1, int64_t len, A* out,
                   int64_t so) {
  gfl_integral_grad<kLocTile>(e, d, inv, gb, f, R1, len, out, so);
}

template <typename A>
void dist_boxes(const A* d, int64_t sd, const A* q, int64_t len, A* box) {
  distance_decode<kLocTile>(d, sd, q, len, box);
}

template <typename A>
void delta_boxes(const A* r, int64_t sr, const A* q, const A* ms, int64_t len, A* wh, A* box) {
  delta_xywh_decode<kLocTile>(r, sr, q, ms, len, wh, box);
}

template <typename A>
void box4_grad(int dec, const A* gb, const A* q, const A* wh, const A* ms, const A* f, int64_t len, A* out,
               int64_t so) {
  box_coder_grad<kLocTile>(dec, gb, q, wh, ms, f, len, out, so);
}

}  // namespace KDOPS_ISA
}  // namespace kdops
