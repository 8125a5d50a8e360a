// CPU kernel of kdops::masked_mse_fwd.
//
// Work is split into tasks of (image n, run of kPix pixels); each task walks all C
// channels of its pixel run, so the pixel-weight gradient (a sum over channels) is
// accumulated without atomics and every partial sum has a fixed owner: results are
// bitwise reproducible whatever the thread count. One read of student and teacher,
// one write of the gradient; no N*C*H*W weight tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

constexpr int64_t kPix = 1024;

template <typename scalar_t, bool WRITE_GRAD, bool GRAD_W>
void masked_mse_cpu_impl(const scalar_t* s, const scalar_t* t, const acc_t<scalar_t>* pw,
                         const acc_t<scalar_t>* cw, int64_t N, int64_t C, int64_t HW,
                         acc_t<scalar_t> scale, scalar_t* grad, acc_t<scalar_t>* gpw,
                         acc_t<scalar_t>* gcw_part, std::vector<double>& loss_part) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = (HW + kPix - 1) / kPix;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> ones(kPix, acc(1));
    std::vector<acc> pw_acc(GRAD_W ? kPix : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, k = task % chunks;
      const int64_t lo = k * kPix, len = std::min(kPix, HW - lo);
      const acc* pwp = pw ? pw + n * HW + lo : ones.data();
      if (GRAD_W) std::fill(pw_acc.begin(), pw_acc.begin() + len, acc(0));
      double task_loss = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (n * C + c) * HW + lo;
        const scalar_t* sp = s + off;
        const scalar_t* tp = t + off;
        const acc cwv = cw ? cw[n * C + c] : acc(1);
        const acc g = acc(2) * scale * cwv;
        acc run = 0;
#pragma omp simd reduction(+ : run)
        for (int64_t i = 0; i < len; ++i) {
          const acc d = acc(sp[i]) - acc(tp[i]);
          const acc dd = d * d;
          run += pwp[i] * dd;
          if (WRITE_GRAD) grad[off + i] = scalar_t(g * pwp[i] * d);
          if (GRAD_W) pw_acc[i] += cwv * dd;
        }
        task_loss += double(cwv) * double(run);
        if (GRAD_W) gcw_part[(n * C + c) * chunks + k] = run;
      }
      loss_part[task] = task_loss;
      if (GRAD_W && gpw) {
        for (int64_t i = 0; i < len; ++i) gpw[n * HW + lo + i] = scale * pw_acc[i];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_mse_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& pixel_weight, const c10::optional<at::Tensor>& channel_weight,
    double scale, bool grad_input, bool grad_weights) {
  TORCH_CHECK(student.dim() == 4 && student.sizes() == teacher.sizes(),
              "kdops::masked_mse_fwd: student and teacher must be (N,C,H,W) of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "kdops::masked_mse_fwd: student and teacher must share a dtype");
  const auto s = student.contiguous();
  const auto t = teacher.contiguous();
  const int64_t N = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const auto acc_type = acc_dtype(s.scalar_type());
  at::Tensor pw, cw;
  if (pixel_weight.has_value()) {
    pw = pixel_weight->contiguous();
    TORCH_CHECK(pw.scalar_type() == acc_type && pw.numel() == N * HW,
                "kdops::masked_mse_fwd: pixel_weight must be (N,H,W) in the accumulation dtype");
  }
  if (channel_weight.has_value()) {
    cw = channel_weight->contiguous();
    TORCH_CHECK(cw.scalar_type() == acc_type && cw.numel() == N * C,
                "kdops::masked_mse_fwd: channel_weight must be (N,C) in the accumulation dtype");
  }
  auto loss = at::empty({}, s.options().dtype(acc_type));
  auto grad = grad_input ? at::empty_like(s) : no_grad_placeholder(s);
  const bool want_gpw = grad_weights && pw.defined();
  const bool want_gcw = grad_weights && cw.defined();
  auto gpw = want_gpw ? at::empty_like(pw) : no_grad_placeholder(loss);
  auto gcw = want_gcw ? at::empty_like(cw) : no_grad_placeholder(loss);
  const int64_t chunks = (HW + kPix - 1) / kPix;
  std::vector<double> loss_part(N * chunks, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "masked_mse_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const acc* pwp = pw.defined() ? pw.data_ptr<acc>() : nullptr;
    const acc* cwp = cw.defined() ? cw.data_ptr<acc>() : nullptr;
    scalar_t* gp = grad_input ? grad.data_ptr<scalar_t>() : nullptr;
    at::Tensor gcw_part;
    if (grad_weights) gcw_part = at::empty({N * C * chunks}, loss.options());
    acc* gcwp = grad_weights ? gcw_part.data_ptr<acc>() : nullptr;
    acc* gpwp = want_gpw ? gpw.data_ptr<acc>() : nullptr;
    const acc sc = static_cast<acc>(scale);
    const auto* sp = s.data_ptr<scalar_t>();
    const auto* tp = t.data_ptr<scalar_t>();
    if (grad_input && grad_weights)
      masked_mse_cpu_impl<scalar_t, true, true>(sp, tp, pwp, cwp, N, C, HW, sc, gp, gpwp, gcwp, loss_part);
    else if (grad_input)
      masked_mse_cpu_impl<scalar_t, true, false>(sp, tp, pwp, cwp, N, C, HW, sc, gp, gpwp, gcwp, loss_part);
    else if (grad_weights)
      masked_mse_cpu_impl<scalar_t, false, true>(sp, tp, pwp, cwp, N, C, HW, sc, gp, gpwp, gcwp, loss_part);
    else
      masked_mse_cpu_impl<scalar_t, false, false>(sp, tp, pwp, cwp, N, C, HW, sc, gp, gpwp, gcwp, loss_part);
    if (want_gcw) {
      acc* out = gcw.data_ptr<acc>();
      for (int64_t nc = 0; nc < N * C; ++nc) {
        double v = 0.0;
        for (int64_t k = 0; k < chunks; ++k) v += gcwp[nc * chunks + k];
        out[nc] = static_cast<acc>(v * scale);
      }
    }
    loss.fill_(ordered_sum(loss_part) * scale);
  });
  return {loss, grad, gpw, gcw};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("masked_mse_fwd", &masked_mse_fwd_cpu); }

}  // namespace kdops
