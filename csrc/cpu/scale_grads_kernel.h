// The vectorised loop of scale_grads_, compiled once per instruction set: scale_grads.cpp
// includes this file through multi_isa.h (no include guard on purpose).
#include <cstdint>

namespace kdops {
namespace KDOPS_ISA {

template <typename A>
void scale_block(A* p, int64_t n, A f) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] *= f;
}

}  // namespace KDOPS_ISA
}  // namespace kdops
