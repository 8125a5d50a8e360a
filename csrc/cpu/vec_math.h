// Element-wise math that GCC vectorises inside `#pragma omp simd` loops: exp as a polynomial
// (float, ~1 ulp; libm in double), log1p as a series, and the gradient shares of max/min ties.
// Inline on purpose: a kernel compiled per instruction set (multi_isa.h) inlines these into
// each of its versions. The selects (clamps, sign picks) only vectorise below AVX-512 with
// -fno-trapping-math (setup.py passes it).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef KDOPS_INLINE
#define KDOPS_INLINE inline __attribute__((always_inline))
#endif

namespace kdops {

// exp(x) for x <= 0 (flushes below -87 to exp(-87) ~ 1.6e-38, a normal float); <= 1.2 ulp.
// Degree-6 relative-minimax polynomial on |r| <= ln2/2 (error 3e-9); 2^n is built from the
// bits of the rounding constant itself, so the whole thing is 14 vector instructions.
KDOPS_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) + 1.5 * 2^23
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;  // |r| <= ln2/2; Cody-Waite split of ln 2
  float p = 0.001381461275741458f;
  p = p * r + 0.008368710055947304f;
  p = p * r + 0.04166838899254799f;
  p = p * r + 0.1666652113199234f;
  p = p * r + 0.4999999403953552f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // p * 2^n, as an integer add of n to p's exponent field: the same value as the product (the
  // result is a normal float: x >= -87 gives n >= -126 with p > 1 there), but on an integer
  // pipe instead of the multiplier that the polynomial keeps busy. A NaN x converts to INT_MIN,
  // whose shift adds 0: the NaN of p passes through.
  const uint32_t k = uint32_t(int32_t(n)) << 23;
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(float));
  bits += k;
  float y;
  std::memcpy(&y, &bits, sizeof(float));
  return y;
}
KDOPS_INLINE double exp_nonpos(double x) { return std::exp(x); }
// exp(x) of any x, vectorisable: exp_nonpos's reduction also holds for 0 < x <= 88; above
// float's range (x > 88.72) it is inf as expf's.
KDOPS_INLINE float exp_any(float x) {
  const float y = exp_nonpos(x > 88.0f ? 88.0f : x);
  return x > 88.7228f ? __builtin_inff() : y;
}
KDOPS_INLINE double exp_any(double x) { return std::exp(x); }

// 2 atanh(s) = log((1 + s) / (1 - s)) for 0 <= s <= 1/3, as a series; with s = e / (2 + e)
// it is log(1 + e) without cancellation for small e.
KDOPS_INLINE float log1p_series(float s) {
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
// log(1 + e) given e and s = e / (2 + e): the series in float, libm in double.
KDOPS_INLINE float log1p_pair(float, float s) { return log1p_series(s); }
KDOPS_INLINE double log1p_pair(double e, double) { return std::log1p(e); }

// torch.maximum / torch.minimum split the gradient evenly on ties; this is the share of `a`.
template <typename T>
KDOPS_INLINE T share_max(T a, T b) { return a > b ? T(1) : (a == b ? T(0.5) : T(0)); }
template <typename T>
KDOPS_INLINE T share_min(T a, T b) { return a < b ? T(1) : (a == b ? T(0.5) : T(0)); }

}  // namespace kdops
