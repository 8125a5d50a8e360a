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
  // BCKD classification: loss = scale * sum_a w_a sum_k BCE(s, sigmoid(t)) |sigmoid(t) - sigmoid(s)|^beta
  // over (N,H,W,J,K) strided views (mmdet's (N,J*K,H,W) or (A,K) without a copy).
  // returns (loss, grad_student, grad_weight)
  m.def(
      "bckd_cls_fwd(Tensor student, Tensor teacher, Tensor? weight, float beta, float scale, "
      "bool grad_student, bool grad_weight) -> (Tensor, Tensor, Tensor)");
  // BCKD localisation: loss = scale * sum_a max_k|sigmoid(tl) - sigmoid(sl)| w_a (1 - GIoU(dec(sr), dec(tr)))
  // decoder 0 distance, 1 GFL integral, 2 DeltaXYWH; loss 0 GIoU, 1 IoU (linear).
  // returns (loss, grad_student_reg, grad_weight)
  m.def(
      "bckd_loc_fwd(Tensor student_reg, Tensor teacher_reg, Tensor student_logits, Tensor teacher_logits, "
      "Tensor priors, Tensor? weight, Tensor? stride, float stride_value, int decoder, int loss, int reg_max, "
      "float[] means, float[] stds, float max_ratio, float scale, bool grad_reg, bool grad_weight) "
      "-> (Tensor, Tensor, Tensor)");
}

// `import kdops._C` loads this library, which runs the registrations above.
static struct PyModuleDef kdops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kdops_module); }
