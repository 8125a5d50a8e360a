// The one CPU SIMD dispatch scheme of kdops: a kernel header is compiled once per instruction
// set, into namespace `base` (x86-64 baseline), `avx2` (AVX2 + FMA) and `avx512` (AVX-512F,
// which implies AVX2; GCC then fuses a*b+c on 512-bit vectors and scalars), and the caller
// picks the version for this CPU at run time with KDOPS_ISA_PICK (common.h), as ATen's own
// CPU kernels do: one build is fast on current CPUs and still runs on old ones.
//
//   #define KDOPS_KERNEL "masked_mse_kernel.h"
//   #include "multi_isa.h"
//   ...
//   KDOPS_ISA_PICK(masked_mse_planes<scalar_t, true>)(args...);
//
// The kernel header puts its code in `namespace kdops { namespace KDOPS_ISA { ... } }`. Every
// header it includes is included by the base pass first, outside any target region, so helpers
// from other headers (vec_math.h, box_coders.h, dense_head.h) are compiled for the baseline and
// inlined into each version. No include guard on purpose: each kernel .cpp includes it once.
// A kernel that gains nothing from AVX-512 defines KDOPS_KERNEL_MAX_AVX2 first: `avx512` then
// names its `avx2` version (box_pool: its sweeps are 4-lane double vectors; measured no faster).
// Elsewhere than GCC on x86-64 there is one version (`avx2` and `avx512` name `base`).
#define KDOPS_ISA base
#include KDOPS_KERNEL
#undef KDOPS_ISA
#if KDOPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KDOPS_ISA avx2
#include KDOPS_KERNEL
#undef KDOPS_ISA
#pragma GCC pop_options
#ifndef KDOPS_KERNEL_MAX_AVX2
#pragma GCC push_options
#pragma GCC target("avx512f")
#define KDOPS_ISA avx512
#include KDOPS_KERNEL
#undef KDOPS_ISA
#pragma GCC pop_options
#else
namespace kdops {
namespace avx512 = avx2;
}  // namespace kdops
#endif
#else
namespace kdops {
namespace avx2 = base;
namespace avx512 = base;
}  // namespace kdops
#endif
#undef KDOPS_KERNEL
#undef KDOPS_KERNEL_MAX_AVX2
