// Helpers shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <type_traits>
#include <vector>

#ifndef KDOPS_INLINE
#define KDOPS_INLINE inline __attribute__((always_inline))
#endif

namespace kdops {

// float for half/bfloat16/float, double for double: every kernel accumulates in it.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// An empty placeholder for a gradient that was not asked for.
inline at::Tensor no_grad_placeholder(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// Sums per-task partials in a fixed order, so results do not depend on thread count.
inline double ordered_sum(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

}  // namespace kdops

namespace kdops {

// Kernels are compiled twice: for the x86-64 baseline and, in a `#pragma GCC target`
// region, for AVX2+FMA; `cpu_has_avx2()` picks one at run time (as ATen's own CPU
// kernels do), so one wheel is fast on current CPUs and still runs on old ones.
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Elements per inner block: low-precision inputs are widened into float buffers of this
// size so that the arithmetic loops run on plain float arrays and vectorise.
constexpr int64_t kVecBlock = 512;

// Returns a pointer to n values of p as acc_t: p itself when no conversion is needed.
template <typename scalar_t>
inline const acc_t<scalar_t>* widen(const scalar_t* p, int64_t n, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t<scalar_t>>(p[i]);
    return buf;
  }
}

// Where n acc_t values destined for p are computed: p itself, or buf (then call narrow()).
template <typename scalar_t>
inline acc_t<scalar_t>* out_buffer(scalar_t* p, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return p;
  } else {
    return buf;
  }
}

template <typename scalar_t>
inline void narrow(const acc_t<scalar_t>* buf, int64_t n, scalar_t* p) {
  if constexpr (!std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }
}

}  // namespace kdops
