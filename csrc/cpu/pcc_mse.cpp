// CPU kernel of kdops::pcc_mse_fwd (PKD's Pearson-correlation MSE, LGD's
// InstanceNorm + MSE).
//
// A "group" is what one mean/std is taken over: channel c over (N,H,W) for
// norm=0, plane (n,c) over (H,W) for norm=1. Each group is N (resp. 1) contiguous
// runs of H*W elements. Pass 1 computes the group's means, centred second moments
// and co-moment of (s,t) by exact two-pass sums inside cache-sized blocks merged with
// Chan's parallel formula (no sum-of-squares cancellation). Pass 2 reads s,t again
// and produces the loss and the gradients, which are affine in (s,t) per group:
//   a = (s-mu_s)/d_s, b = (t-mu_t)/d_t, L = sum (a-b)^2 / numel,
//   dL/ds = 2/(numel d_s) * ((1-k_s) a - b), with k_s from the std's derivative
// (see kdops/ops/pcc_mse.py for the derivation). Groups are owned by one task each,
// so results are deterministic. No normalised copy of either input is allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct Moments {
  double n = 0, ms = 0, mt = 0, m2s = 0, m2t = 0, cst = 0;
  // Chan et al.'s pairwise update with a block of nb elements.
  void merge(double nb, double msb, double mtb, double m2sb, double m2tb, double cstb) {
    if (nb == 0) return;
    const double tot = n + nb, ds = msb - ms, dt = mtb - mt, f = n * nb / tot;
    m2s += m2sb + ds * ds * f;
    m2t += m2tb + dt * dt * f;
    cst += cstb + ds * dt * f;
    ms += ds * nb / tot;
    mt += dt * nb / tot;
    n = tot;
  }
};

struct Coeffs {
  double mus, mut, ids, idt;  // means and 1/d
  double gs, gt;              // 2*scale/d
  double ks, kt;              // std-derivative corrections
};

Coeffs coefficients(const Moments& m, int64_t norm, double eps, double scale) {
  Coeffs c{};
  const double M = m.n;
  double sig_s = 0, sig_t = 0, ds, dt;
  if (norm == 0) {
    // PKD: unbiased std; a single element has no spread (torch would give nan).
    if (M > 1) {
      sig_s = std::sqrt(std::max(m.m2s, 0.0) / (M - 1));
      sig_t = std::sqrt(std::max(m.m2t, 0.0) / (M - 1));
    }
    ds = sig_s + eps;
    dt = sig_t + eps;
  } else {
    ds = std::sqrt(std::max(m.m2s, 0.0) / M + eps);
    dt = std::sqrt(std::max(m.m2t, 0.0) / M + eps);
  }
  const double saa = m.m2s / (ds * ds), sbb = m.m2t / (dt * dt), sab = m.cst / (ds * dt);
  if (norm == 0) {
    // d sigma/ds_i = (s_i-mu)/((M-1) sigma); its limit term vanishes for a constant group.
    c.ks = sig_s > 0 ? ds * (saa - sab) / ((M - 1) * sig_s) : 0.0;
    c.kt = sig_t > 0 ? dt * (sbb - sab) / ((M - 1) * sig_t) : 0.0;
  } else {
    c.ks = (saa - sab) / M;
    c.kt = (sbb - sab) / M;
  }
  c.mus = m.ms;
  c.mut = m.mt;
  c.ids = 1.0 / ds;
  c.idt = 1.0 / dt;
  c.gs = 2.0 * scale / ds;
  c.gt = 2.0 * scale / dt;
  return c;
}

}  // namespace
}  // namespace kdops

#define KDOPS_ISA base
#include "pcc_mse_kernel.h"
#undef KDOPS_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KDOPS_ISA avx2
#include "pcc_mse_kernel.h"
#undef KDOPS_ISA
#pragma GCC pop_options

namespace kdops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pcc_mse_fwd_cpu(const at::Tensor& student,
                                                              const at::Tensor& teacher, int64_t norm,
                                                              double eps, bool grad_student,
                                                              bool grad_teacher) {
  TORCH_CHECK(student.dim() == 4 && student.sizes() == teacher.sizes(),
              "kdops::pcc_mse_fwd: student and teacher must be (N,C,H,W) of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "kdops::pcc_mse_fwd: student and teacher must share a dtype");
  TORCH_CHECK(norm == 0 || norm == 1, "kdops::pcc_mse_fwd: norm must be 0 (channel) or 1 (instance)");
  const auto s = student.contiguous();
  const auto t = teacher.contiguous();
  const int64_t N = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const int64_t numel = s.numel();
  auto loss = at::zeros({}, s.options().dtype(acc_dtype(s.scalar_type())));
  auto gs = grad_student ? at::empty_like(s) : no_grad_placeholder(s);
  auto gt = grad_teacher ? at::empty_like(t) : no_grad_placeholder(t);
  if (numel == 0) {
    return {loss, gs, gt};
  }
  const double scale = 1.0 / double(numel);
  // Group g covers `runs` runs of HW elements at g*HW + r*run_stride.
  const int64_t groups = norm == 0 ? C : N * C;
  const int64_t runs = norm == 0 ? N : 1;
  const int64_t run_stride = C * HW;
  std::vector<double> part(groups, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pcc_mse_fwd", [&] {
    scalar_t* gsp = grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    auto* fn = cpu_has_avx2() ? &avx2::pcc_groups<scalar_t> : &base::pcc_groups<scalar_t>;
    fn(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), gsp, gtp, groups, runs, run_stride, HW, norm, eps, scale,
       part.data());
  });
  loss.fill_(ordered_sum(part) * scale);
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("pcc_mse_fwd", &pcc_mse_fwd_cpu); }

}  // namespace kdops
