// Element-wise math of the BCKD kernels, written so that GCC vectorises the loops that
// call it (`#pragma omp simd`): exp and log1p are polynomial (float, ~1 ulp) or libm
// (double), and the loops are compiled for AVX-512, AVX2 and baseline x86-64 with a
// run-time pick (target_clones), so one build runs fast on any x86-64. The selects (clamps,
// sign picks) only vectorise below AVX-512 with -fno-trapping-math (setup.py passes it).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KDOPS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KDOPS_SIMD_CLONES
#endif
#ifndef KDOPS_INLINE
#define KDOPS_INLINE inline __attribute__((always_inline))
#endif

namespace kdops {
namespace bckd {

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

template <typename T>
KDOPS_INLINE T sigmoid_of(T x, T e /* exp(-|x|) */) {
  const T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : e * inv;
}

// torch.maximum / torch.minimum split the gradient evenly on ties; this is the share of `a`.
template <typename T>
KDOPS_INLINE T share_max(T a, T b) { return a > b ? T(1) : (a == b ? T(0.5) : T(0)); }
template <typename T>
KDOPS_INLINE T share_min(T a, T b) { return a < b ? T(1) : (a == b ? T(0.5) : T(0)); }

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

}  // namespace bckd
}  // namespace kdops
