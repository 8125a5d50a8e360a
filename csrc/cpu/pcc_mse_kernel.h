// Kernel bodies of pcc_mse, compiled once per instruction set: pcc_mse.cpp includes this
// file through multi_isa.h, once per instruction set (no include guard on purpose). Uses Moments,
// Coeffs and coefficients() from pcc_mse.cpp.
#include <ATen/Parallel.h>

#include <algorithm>

namespace kdops {
namespace KDOPS_ISA {

// Exact two-pass moments inside each block, merged into m with Chan's formula.
template <typename scalar_t>
void accumulate_run(const scalar_t* s, const scalar_t* t, int64_t len, Moments& m) {
  using acc = acc_t<scalar_t>;
  acc sb[kVecBlock], tb[kVecBlock];
  for (int64_t lo = 0; lo < len; lo += kVecBlock) {
    const int64_t nb = std::min(kVecBlock, len - lo);
    const acc* __restrict sp = widen(s + lo, nb, sb);
    const acc* __restrict tp = widen(t + lo, nb, tb);
    acc ss = 0, st = 0;
#pragma omp simd reduction(+ : ss, st)
    for (int64_t i = 0; i < nb; ++i) {
      ss += sp[i];
      st += tp[i];
    }
    const acc mus = ss / acc(nb), mut = st / acc(nb);
    acc m2s = 0, m2t = 0, cst = 0;
#pragma omp simd reduction(+ : m2s, m2t, cst)
    for (int64_t i = 0; i < nb; ++i) {
      const acc a = sp[i] - mus, b = tp[i] - mut;
      m2s += a * a;
      m2t += b * b;
      cst += a * b;
    }
    m.merge(double(nb), double(mus), double(mut), double(m2s), double(m2t), double(cst));
  }
}

template <typename acc, bool GS, bool GT>
inline acc loss_grad_block(const acc* __restrict sp, const acc* __restrict tp, int64_t n, acc mus, acc mut,
                           acc ids, acc idt, acc cs, acc ct, acc one_ks, acc one_kt, acc* __restrict gs,
                           acc* __restrict gt) {
  acc run = 0;
#pragma omp simd reduction(+ : run)
  for (int64_t i = 0; i < n; ++i) {
    const acc a = (sp[i] - mus) * ids, b = (tp[i] - mut) * idt;
    const acc d = a - b;
    run += d * d;
    if constexpr (GS) gs[i] = cs * (one_ks * a - b);
    if constexpr (GT) gt[i] = ct * (one_kt * b - a);
  }
  return run;
}

template <typename scalar_t, bool GS, bool GT>
double loss_grad_run(const scalar_t* s, const scalar_t* t, int64_t len, const Coeffs& k, double grad_scale,
                     scalar_t* gs, scalar_t* gt) {
  using acc = acc_t<scalar_t>;
  acc sb[kVecBlock], tb[kVecBlock], gsb[kVecBlock], gtb[kVecBlock];
  const acc mus = acc(k.mus), mut = acc(k.mut), ids = acc(k.ids), idt = acc(k.idt);
  const acc cs = acc(k.gs * grad_scale), ct = acc(k.gt * grad_scale);
  const acc one_ks = acc(k.one_ks), one_kt = acc(k.one_kt);
  double total = 0;
  for (int64_t lo = 0; lo < len; lo += kVecBlock) {
    const int64_t nb = std::min(kVecBlock, len - lo);
    const acc* sp = widen(s + lo, nb, sb);
    const acc* tp = widen(t + lo, nb, tb);
    acc* gso = GS ? out_buffer(gs + lo, gsb) : gsb;
    acc* gto = GT ? out_buffer(gt + lo, gtb) : gtb;
    total += double(loss_grad_block<acc, GS, GT>(sp, tp, nb, mus, mut, ids, idt, cs, ct, one_ks, one_kt, gso, gto));
    if constexpr (GS) narrow(gsb, nb, gs + lo);
    if constexpr (GT) narrow(gtb, nb, gt + lo);
  }
  return total;
}

// Forward: per group, the moments (pass 1), its coefficients, and the exact loss (pass 2,
// mostly from cache: a group is a few hundred KB at most on COCO shapes).
// With `gs`, the second pass also writes the student's gradient of the loss times `grad_scale`
// (pcc_mse_fwd_grad: its `scale`, a loss weight folded into the op).
template <typename scalar_t>
void pcc_forward(const scalar_t* s, const scalar_t* t, int64_t groups, int64_t runs, int64_t run_stride,
                 int64_t HW, int64_t norm, double eps, double scale, Coeffs* coef, double* part,
                 scalar_t* gs = nullptr, double grad_scale = 1.0) {
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      Moments m;
      for (int64_t r = 0; r < runs; ++r) accumulate_run(s + g * HW + r * run_stride, t + g * HW + r * run_stride, HW, m);
      coef[g] = coefficients(m, norm, eps, scale);
      double total = 0;
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t off = g * HW + r * run_stride;
        total += gs ? loss_grad_run<scalar_t, true, false>(s + off, t + off, HW, coef[g], grad_scale, gs + off, nullptr)
                    : loss_grad_run<scalar_t, false, false>(s + off, t + off, HW, coef[g], 0.0, nullptr, nullptr);
      }
      part[g] = total;
    }
  });
}

template <typename scalar_t, bool GS, bool GT>
void pcc_backward_impl(const scalar_t* s, const scalar_t* t, scalar_t* gs, scalar_t* gt, int64_t groups,
                       int64_t runs, int64_t run_stride, int64_t HW, const Coeffs* coef, double grad_loss) {
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t off = g * HW + r * run_stride;
        loss_grad_run<scalar_t, GS, GT>(s + off, t + off, HW, coef[g], grad_loss, GS ? gs + off : nullptr,
                                        GT ? gt + off : nullptr);
      }
    }
  });
}

template <typename scalar_t>
void pcc_backward(const scalar_t* s, const scalar_t* t, scalar_t* gs, scalar_t* gt, int64_t groups, int64_t runs,
                  int64_t run_stride, int64_t HW, const Coeffs* coef, double grad_loss) {
  if (gs && gt) pcc_backward_impl<scalar_t, true, true>(s, t, gs, gt, groups, runs, run_stride, HW, coef, grad_loss);
  else if (gs) pcc_backward_impl<scalar_t, true, false>(s, t, gs, gt, groups, runs, run_stride, HW, coef, grad_loss);
  else if (gt) pcc_backward_impl<scalar_t, false, true>(s, t, gs, gt, groups, runs, run_stride, HW, coef, grad_loss);
}

}  // namespace KDOPS_ISA
}  // namespace kdops
