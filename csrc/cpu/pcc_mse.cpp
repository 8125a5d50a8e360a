// CPU kernel of kdops::pcc_mse_fwd (PKD's Pearson-correlation MSE, LGD's
// InstanceNorm + MSE).
//
// A "group" is what one mean/std is taken over: channel c over (N,H,W) for
// norm=0, plane (n,c) over (H,W) for norm=1. Each group is N (resp. 1) contiguous
// runs of H*W elements. Pass 1 computes the group's means, centred second moments
// and co-moment of (s,t) by exact two-pass sums inside cache-sized blocks merged with
// Chan's parallel formula (no sum-of-squares cancellation). Pass 2 reads s,t again
// (from cache) for the exact loss and stores per-group coefficients; the backward op
// reads s,t once more and writes the gradients, which are affine in (s,t) per group:
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

// Per-group coefficients; the layout of one row of the (G,8) `coeffs` tensor.
struct Coeffs {
  double mus, mut, ids, idt;  // means and 1/d
  double gs, gt;              // 2*scale/d
  double one_ks, one_kt;      // 1 - std-derivative corrections
};
static_assert(sizeof(Coeffs) == 8 * sizeof(double), "Coeffs must match a (G,8) float64 row");

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
    c.one_ks = 1.0 - (sig_s > 0 ? ds * (saa - sab) / ((M - 1) * sig_s) : 0.0);
    c.one_kt = 1.0 - (sig_t > 0 ? dt * (sbb - sab) / ((M - 1) * sig_t) : 0.0);
  } else {
    c.one_ks = 1.0 - (saa - sab) / M;
    c.one_kt = 1.0 - (sbb - sab) / M;
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

#define KDOPS_KERNEL "pcc_mse_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

void check_pair(const at::Tensor& s, const at::Tensor& t, const char* op) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes(), op, ": student and teacher must be (N,C,H,W) of one shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), op, ": student and teacher must share a dtype");
}

// Group g covers `runs` runs of HW elements at g*HW + r*run_stride.
struct Groups {
  int64_t groups, runs, run_stride, HW;
  Groups(const at::Tensor& s, int64_t norm)
      : groups(norm == 0 ? s.size(1) : s.size(0) * s.size(1)),
        runs(norm == 0 ? s.size(0) : 1),
        run_stride(s.size(1) * s.size(2) * s.size(3)),
        HW(s.size(2) * s.size(3)) {}
};

// out_scale multiplies the loss and the student's gradient (pcc_mse_fwd_grad's `scale`).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pcc_mse_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           int64_t norm, double eps, bool grad_student,
                                                           double out_scale = 1.0) {
  check_pair(student, teacher, "kdops::pcc_mse_fwd");
  TORCH_CHECK(norm == 0 || norm == 1, "kdops::pcc_mse_fwd: norm must be 0 (channel) or 1 (instance)");
  const auto s = student.contiguous();
  const auto t = teacher.contiguous();
  const Groups G(s, norm);
  auto loss = at::zeros({}, s.options().dtype(acc_dtype(s.scalar_type())));
  auto coeffs = at::zeros({G.groups, 8}, s.options().dtype(at::kDouble));
  auto gs = grad_student ? at::empty_like(s) : no_grad_placeholder(s);
  if (s.numel() == 0) return {loss, coeffs, gs};
  const double scale = 1.0 / double(s.numel());
  std::vector<double> part(G.groups, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pcc_mse_fwd", [&] {
    KDOPS_ISA_PICK(pcc_forward<scalar_t>)(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), G.groups, G.runs,
                                          G.run_stride, G.HW, norm, eps, scale,
                                          reinterpret_cast<Coeffs*>(coeffs.data_ptr<double>()), part.data(),
                                          grad_student ? gs.data_ptr<scalar_t>() : nullptr, out_scale);
  });
  loss.fill_(ordered_sum(part) * scale * out_scale);
  return {loss, coeffs, gs};
}

std::tuple<at::Tensor, at::Tensor> pcc_mse_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   int64_t norm, double eps) {
  auto out = pcc_mse_cpu(student, teacher, norm, eps, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> pcc_mse_fwd_grad_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        int64_t norm, double eps, double scale) {
  auto out = pcc_mse_cpu(student, teacher, norm, eps, true, scale);
  return {std::get<0>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor> pcc_mse_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                   const at::Tensor& teacher, const at::Tensor& coeffs, int64_t norm,
                                                   bool grad_student, bool grad_teacher) {
  check_pair(student, teacher, "kdops::pcc_mse_bwd");
  const auto s = student.contiguous();
  const auto t = teacher.contiguous();
  const Groups G(s, norm);
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble && coeffs.dim() == 2 && coeffs.size(0) == G.groups &&
                  coeffs.size(1) == 8,
              "kdops::pcc_mse_bwd: coeffs must be the (G,8) float64 tensor of pcc_mse_fwd");
  TORCH_CHECK(grad_loss.numel() == 1, "kdops::pcc_mse_bwd: grad_loss must have one element");
  auto gs = grad_student ? at::empty_like(s) : no_grad_placeholder(s);
  auto gt = grad_teacher ? at::empty_like(t) : no_grad_placeholder(t);
  if (s.numel() == 0 || !(grad_student || grad_teacher)) return {gs, gt};
  const double gl = grad_loss.item<double>();  // free on the CPU
  const auto c = coeffs.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pcc_mse_bwd", [&] {
    KDOPS_ISA_PICK(pcc_backward<scalar_t>)(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                           grad_student ? gs.data_ptr<scalar_t>() : nullptr,
                                           grad_teacher ? gt.data_ptr<scalar_t>() : nullptr, G.groups, G.runs,
                                           G.run_stride, G.HW, reinterpret_cast<const Coeffs*>(c.data_ptr<double>()),
                                           gl);
  });
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("pcc_mse_fwd", &pcc_mse_fwd_cpu);
  m.impl("pcc_mse_fwd_grad", &pcc_mse_fwd_grad_cpu);
  m.impl("pcc_mse_bwd", &pcc_mse_bwd_cpu);
}

}  // namespace kdops
