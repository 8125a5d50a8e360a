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
  int32_t bits;  // t's bits are those of 1.5 * 2^23 plus n
  std::memcpy(&bits, &t, sizeof(float));
  bits = (bits - 0x4B400000 + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
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
