// Compiles the kernel header named by KDOPS_KERNEL twice: as namespace `base` for the
// x86-64 baseline and as namespace `avx2` for AVX2+FMA (chosen at run time with
// cpu_has_avx2()). No include guard on purpose: each kernel .cpp includes it once.
//   #define KDOPS_KERNEL "masked_mse_kernel.h"
//   #include "multi_isa.h"
#define KDOPS_ISA base
#include KDOPS_KERNEL
#undef KDOPS_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KDOPS_ISA avx2
#include KDOPS_KERNEL
#undef KDOPS_ISA
#pragma GCC pop_options
#undef KDOPS_KERNEL
