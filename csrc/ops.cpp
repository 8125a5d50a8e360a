// Schemas of every kdops op. One registration point; kernels live in
// csrc/cpu/<op>.cpp (CPU), kdops/triton/<op>.py (CUDA, registered from Python)
// and csrc/cuda/<op>.cu where CUDA C++ beats Triton.
//
// Loss ops follow the "gradient in forward" pattern: the forward op returns the
// loss and, when asked, the gradients of the loss itself; autograd (attached in
// kdops/ops/<op>.py through torch.library) only scales them by the incoming
// gradient. Gradients that were not asked for come back as empty (0-element) tensors.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(kdops, m) {
  // loss = scale * sum_{n,c,h,w} pw[n,h,w] * cw[n,c] * (s - t)^2
  // returns (loss, grad_student, grad_pixel_weight, grad_channel_weight)
  m.def(
      "masked_mse_fwd(Tensor student, Tensor teacher, Tensor? pixel_weight, "
      "Tensor? channel_weight, float scale, bool grad_input, bool grad_weights) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // loss = mean((norm(s) - norm(t))^2); norm 0 = per channel over (N,H,W) with
  // unbiased std + eps (PKD), 1 = per (n,c) over (H,W) with sqrt(biased var + eps).
  // returns (loss, grad_student, grad_teacher)
  m.def(
      "pcc_mse_fwd(Tensor student, Tensor teacher, int norm, float eps, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // Multi-scale deformable attention (Deformable DETR; mmcv's MultiScaleDeformableAttnFunction
  // without im2col_step). value (N,S,M,D), spatial_shapes (L,2) int64 [H,W],
  // level_start_index (L,) int64, sampling_locations (N,Q,M,L,P,2) [x,y] in [0,1],
  // attention_weights (N,Q,M,L,P) -> (N,Q,M*D). Bilinear, zero padding, align_corners=False.
  m.def(
      "ms_deform_attn_fwd(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // returns (grad_value, grad_sampling_locations, grad_attention_weights); a gradient not asked
  // for is an empty tensor. deterministic: no floating-point atomics (CUDA picks a sorted path).
  m.def(
      "ms_deform_attn_bwd(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool grad_value, bool grad_sampling, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

// `import kdops._C` loads this library, which runs the registrations above.
static struct PyModuleDef kdops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kdops_module); }
