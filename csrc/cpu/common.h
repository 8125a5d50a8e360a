// Helpers shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

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
