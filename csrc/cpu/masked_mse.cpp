// CPU kernels of kdops::masked_mse_fwd, masked_mse_fwd_grad and masked_mse_bwd.
//
// One read of student and teacher, one write of the gradient; no N*C*H*W weight tensor. When only
// the student needs a gradient, masked_mse_fwd_grad writes it in the forward pass (the least traffic
// the loss and its gradient need: the roof) and the backward only scales it (nothing at all for an
// incoming gradient of exactly 1 once the graph is freed); otherwise forward reads the inputs and
// masked_mse_bwd reads them again and writes the gradients (nothing input-sized kept in between).
// Every partial sum has a fixed owner (a plane, or a pixel run when weight gradients are
// needed), so results are bitwise reproducible whatever the thread count. The loops live
// in masked_mse_kernel.h, compiled per instruction set (multi_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

#define KDOPS_KERNEL "masked_mse_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

template <typename scalar_t>
void run_masked_mse(const scalar_t* s, const scalar_t* t, const acc_t<scalar_t>* pw, const acc_t<scalar_t>* cw,
                    int64_t N, int64_t C, int64_t HW, acc_t<scalar_t> scale, scalar_t* grad,
                    acc_t<scalar_t>* gpw, acc_t<scalar_t>* gcw_part, bool weights, double* loss_part) {
#define KDOPS_CALL(G)                                                                                      \
  (weights ? KDOPS_ISA_PICK(masked_mse_pixel_runs<scalar_t, G>)(s, t, pw, cw, N, C, HW, scale, grad, gpw,  \
                                                                gcw_part, loss_part)                       \
           : KDOPS_ISA_PICK(masked_mse_planes<scalar_t, G>)(s, t, pw, cw, N, C, HW, scale, grad, loss_part))
  if (grad) {
    KDOPS_CALL(true);
  } else {
    KDOPS_CALL(false);
  }
#undef KDOPS_CALL
}

// The loss and, when asked, the gradients of scale * loss (one pass over the data).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_mse_cpu(
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
  if (s.numel() == 0) {  // an empty sum: exactly 0, whatever the weights hold (inf * 0 would be NaN)
    loss.zero_();
    grad.zero_();
    gpw.zero_();
    gcw.zero_();
    return {loss, grad, gpw, gcw};
  }
  const int64_t runs = (HW + kVecBlock - 1) / kVecBlock;
  std::vector<double> loss_part(grad_weights ? N * runs : N * C, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "masked_mse_fwd", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor gcw_part;
    if (grad_weights) gcw_part = at::empty({N * C * runs}, loss.options());
    acc* gcwp = grad_weights ? gcw_part.data_ptr<acc>() : nullptr;
    run_masked_mse<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                             pw.defined() ? pw.data_ptr<acc>() : nullptr, cw.defined() ? cw.data_ptr<acc>() : nullptr,
                             N, C, HW, static_cast<acc>(scale), grad_input ? grad.data_ptr<scalar_t>() : nullptr,
                             want_gpw ? gpw.data_ptr<acc>() : nullptr, gcwp, grad_weights, loss_part.data());
    if (want_gcw) {
      acc* out = gcw.data_ptr<acc>();
      for (int64_t nc = 0; nc < N * C; ++nc) {
        double v = 0.0;
        for (int64_t k = 0; k < runs; ++k) v += gcwp[nc * runs + k];
        out[nc] = static_cast<acc>(v * scale);
      }
    }
  });
  loss.fill_(ordered_sum(loss_part) * scale);
  return {loss, grad, gpw, gcw};
}

}  // namespace

at::Tensor masked_mse_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& pixel_weight,
                              const c10::optional<at::Tensor>& channel_weight, double scale) {
  return std::get<0>(masked_mse_cpu(student, teacher, pixel_weight, channel_weight, scale, false, false));
}

std::tuple<at::Tensor, at::Tensor> masked_mse_fwd_grad_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                          const c10::optional<at::Tensor>& pixel_weight,
                                                          const c10::optional<at::Tensor>& channel_weight,
                                                          double scale) {
  auto out = masked_mse_cpu(student, teacher, pixel_weight, channel_weight, scale, true, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& pixel_weight, const c10::optional<at::Tensor>& channel_weight, double scale,
    bool grad_input, bool grad_weights) {
  TORCH_CHECK(grad_loss.numel() == 1, "kdops::masked_mse_bwd: grad_loss must have one element");
  // On the CPU reading the incoming gradient costs nothing (no device synchronisation).
  const double g = grad_loss.item<double>();
  auto out = masked_mse_cpu(student, teacher, pixel_weight, channel_weight, scale * g, grad_input, grad_weights);
  return {std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("masked_mse_fwd", &masked_mse_fwd_cpu);
  m.impl("masked_mse_fwd_grad", &masked_mse_fwd_grad_cpu);
  m.impl("masked_mse_bwd", &masked_mse_bwd_cpu);
}

}  // namespace kdops
