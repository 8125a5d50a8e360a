// The inner loop of kdops::nms_mask_fwd's CPU kernel, compiled once per instruction set: nms_mask.cpp
// includes this file through multi_isa.h (no include guard on purpose). The baseline (SSE2) version
// stays scalar (GCC finds no profitable vector form there); AVX2 and AVX-512 run 4 and 8 IoUs a step.
#include <cstdint>

namespace kdops {
namespace KDOPS_ISA {

// sup[j] |= IoU(box i, box j) > thr for every j in (i, K): torchvision's inner loop term for term in
// float64 (torchvision skips the j already suppressed; here their flag is simply ORed again, which
// lets the loop vectorise). std::max(a, b) is (a < b) ? b : a and std::min(a, b) is (b < a) ? b : a,
// written out on values, in torchvision's argument order. No fused multiply-add may change the
// rounding of `iarea + area[j] - inter` (the AVX2 target has FMA): contraction is off here.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline void suppress_after(const double* __restrict x1, const double* __restrict y1, const double* __restrict x2,
                           const double* __restrict y2, const double* __restrict area, int64_t* __restrict sup,
                           int64_t i, int64_t K, double thr) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const double ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
  for (int64_t j = i + 1; j < K; ++j) {
    const double jx1 = x1[j], jy1 = y1[j], jx2 = x2[j], jy2 = y2[j];
    const double xx1 = ix1 < jx1 ? jx1 : ix1;  // std::max(ix1, x1[j])
    const double yy1 = iy1 < jy1 ? jy1 : iy1;  // std::max(iy1, y1[j])
    const double xx2 = jx2 < ix2 ? jx2 : ix2;  // std::min(ix2, x2[j])
    const double yy2 = jy2 < iy2 ? jy2 : iy2;  // std::min(iy2, y2[j])
    const double dw = xx2 - xx1, dh = yy2 - yy1;
    const double w = 0.0 < dw ? dw : 0.0;  // std::max(0, xx2 - xx1)
    const double h = 0.0 < dh ? dh : 0.0;
    const double inter = w * h;
    const double ovr = inter / (iarea + area[j] - inter);
    sup[j] |= static_cast<int64_t>(ovr > thr);
  }
}

}  // namespace KDOPS_ISA
}  // namespace kdops
