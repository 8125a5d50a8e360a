// Kernel bodies of masked_mse, compiled once per instruction set: masked_mse.cpp includes
// this file through multi_isa.h (no include guard on purpose).
#include <ATen/Parallel.h>

#include <algorithm>

namespace kdops {
namespace KDOPS_ISA {

// sum w*d^2 over a block; optionally writes g*w*d (the gradient) to grad.
template <typename acc, bool WRITE_GRAD>
inline acc mse_block(const acc* __restrict s, const acc* __restrict t, const acc* __restrict w, acc g,
                     acc* __restrict grad, int64_t n) {
  acc run = 0;
#pragma omp simd reduction(+ : run)
  for (int64_t i = 0; i < n; ++i) {
    const acc d = s[i] - t[i];
    const acc wd = w[i] * d;
    run += wd * d;
    if constexpr (WRITE_GRAD) grad[i] = g * wd;
  }
  return run;
}

// Tasks are (n, c) planes, read front to back: contiguous streams, one owner per partial.
template <typename scalar_t, bool WRITE_GRAD>
void masked_mse_planes(const scalar_t* s, const scalar_t* t, const acc_t<scalar_t>* pw,
                       const acc_t<scalar_t>* cw, int64_t N, int64_t C, int64_t HW, acc_t<scalar_t> scale,
                       scalar_t* grad, double* loss_part) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    acc sb[kVecBlock], tb[kVecBlock], gb[kVecBlock], ones[kVecBlock];
    std::fill(ones, ones + kVecBlock, acc(1));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, off = p * HW;
      const acc cwv = cw ? cw[p] : acc(1);
      const acc g = acc(2) * scale * cwv;
      double total = 0;
      for (int64_t lo = 0; lo < HW; lo += kVecBlock) {
        const int64_t len = std::min(kVecBlock, HW - lo);
        const acc* sp = widen(s + off + lo, len, sb);
        const acc* tp = widen(t + off + lo, len, tb);
        const acc* wp = pw ? pw + n * HW + lo : ones;
        if constexpr (WRITE_GRAD) {
          acc* go = out_buffer(grad + off + lo, gb);
          total += mse_block<acc, true>(sp, tp, wp, g, go, len);
          narrow(gb, len, grad + off + lo);
        } else {
          total += mse_block<acc, false>(sp, tp, wp, g, nullptr, len);
        }
      }
      loss_part[p] = double(cwv) * total;
    }
  });
}

// With weight gradients: tasks are (n, run of kVecBlock pixels) walking all channels, so
// the pixel-weight gradient (a sum over channels) has one owner; channel-weight gradient
// partials are written per (n, c, run) and summed in a fixed order by the caller.
template <typename scalar_t, bool WRITE_GRAD>
void masked_mse_pixel_runs(const scalar_t* s, const scalar_t* t, const acc_t<scalar_t>* pw,
                           const acc_t<scalar_t>* cw, int64_t N, int64_t C, int64_t HW,
                           acc_t<scalar_t> scale, scalar_t* grad, acc_t<scalar_t>* gpw,
                           acc_t<scalar_t>* gcw_part, double* loss_part) {
  using acc = acc_t<scalar_t>;
  const int64_t runs = (HW + kVecBlock - 1) / kVecBlock;
  at::parallel_for(0, N * runs, 1, [&](int64_t begin, int64_t end) {
    acc sb[kVecBlock], tb[kVecBlock], gb[kVecBlock], ones[kVecBlock], pacc[kVecBlock];
    std::fill(ones, ones + kVecBlock, acc(1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / runs, k = task % runs;
      const int64_t lo = k * kVecBlock, len = std::min(kVecBlock, HW - lo);
      const acc* __restrict wp = pw ? pw + n * HW + lo : ones;
      std::fill(pacc, pacc + len, acc(0));
      double total = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (n * C + c) * HW + lo;
        const acc* __restrict sp = widen(s + off, len, sb);
        const acc* __restrict tp = widen(t + off, len, tb);
        const acc cwv = cw ? cw[n * C + c] : acc(1);
        const acc g = acc(2) * scale * cwv;
        acc* __restrict go = WRITE_GRAD ? out_buffer(grad + off, gb) : gb;
        acc run = 0;
#pragma omp simd reduction(+ : run)
        for (int64_t i = 0; i < len; ++i) {
          const acc d = sp[i] - tp[i];
          const acc dd = d * d;
          run += wp[i] * dd;
          pacc[i] += cwv * dd;
          if constexpr (WRITE_GRAD) go[i] = g * wp[i] * d;
        }
        if constexpr (WRITE_GRAD) narrow(gb, len, grad + off);
        total += double(cwv) * double(run);
        gcw_part[(n * C + c) * runs + k] = run;
      }
      loss_part[task] = total;
      if (gpw) {
        for (int64_t i = 0; i < len; ++i) gpw[n * HW + lo + i] = scale * pacc[i];
      }
    }
  });
}

}  // namespace KDOPS_ISA
}  // namespace kdops
