// Schemas of every kdops op: the one place an op's signature is defined. Each op has its
// kernels in csrc/cpu/<op>.cpp (CPU, registered below with TORCH_LIBRARY_IMPL), kdops/triton/<op>.py
// and, where CUDA C++ beats Triton, csrc/cuda/<op>.cu. Everything Python adds is attached by one
// register_op call in kdops/ops/<op>.py (kdops/ops/_registry.py): the fake (meta) kernels for
// torch.compile, autograd, and the CUDA launchers (Triton, or the .cu kernel where registered).
//
// Gradients of the loss ops come in one of two ways. masked_mse, pcc_mse (and ms_deform_attn,
// mask_pool, gather_level_features) have a backward op that reads the saved inputs (for pcc_mse
// also a few per-group coefficients) and writes each gradient once: no input-sized buffer lives
// between forward and backward. bckd_cls_loss and bckd_loc_loss compute the gradient in the
// forward pass (asked for with grad_* flags) and backward only scales it by the incoming gradient
// (scale_grads_ on the CPU). On the CPU, when only the student needs a gradient (the KD case),
// masked_mse and pcc_mse do the same through their *_fwd_grad schemas: one pass over the inputs
// less (issue 20: masked_mse at 1.7x its roof instead of 2.1x), for one student-sized buffer held
// until backward. Backward ops have no derivative of their own: double backward
// (create_graph=True) is refused with a RuntimeError in kdops/ops, except where the adjoint of a
// backward is an op itself (gather_level_features, box_pool / box_paint, mask_pool).
//
// Empty inputs (no boxes, rows or anchors, a level with H*W = 0, an empty batch) give exact
// zeros: an empty sum is 0 whatever the weights hold. Gradients that were not asked for come
// back as empty (0-element) tensors.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(kdops, m) {
  // loss = scale * sum_{n,c,h,w} pw[n,h,w] * cw[n,c] * (s - t)^2  (0-d, accumulation dtype)
  m.def(
      "masked_mse_fwd(Tensor student, Tensor teacher, Tensor? pixel_weight, Tensor? channel_weight, "
      "float scale) -> Tensor");
  // CPU only: (loss, grad_student of loss) in the one pass that reads the inputs -- used when only the
  // student needs a gradient; its backward scales the saved gradient (in place once the graph is freed).
  m.def(
      "masked_mse_fwd_grad(Tensor student, Tensor teacher, Tensor? pixel_weight, Tensor? channel_weight, "
      "float scale) -> (Tensor, Tensor)");
  // gradients of grad_loss * loss: (grad_student, grad_pixel_weight, grad_channel_weight);
  // grad_teacher = -grad_student.
  m.def(
      "masked_mse_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? pixel_weight, "
      "Tensor? channel_weight, float scale, bool grad_input, bool grad_weights) -> (Tensor, Tensor, Tensor)");
  // loss = mean((norm(s) - norm(t))^2); norm 0 = per channel over (N,H,W) with unbiased
  // std + eps (PKD), 1 = per (n,c) over (H,W) with sqrt(biased var + eps).
  // returns (loss, coeffs): coeffs (G,8) float64 per normalisation group
  // [mu_s, mu_t, 1/d_s, 1/d_t, 2/(numel d_s), 2/(numel d_t), 1-k_s, 1-k_t].
  m.def("pcc_mse_fwd(Tensor student, Tensor teacher, int norm, float eps) -> (Tensor, Tensor)");
  // CPU only: (loss, grad_student of loss), the gradient written by the forward's second pass -- used
  // when only the student needs a gradient; its backward scales the saved gradient.
  m.def("pcc_mse_fwd_grad(Tensor student, Tensor teacher, int norm, float eps, float scale) -> (Tensor, Tensor)");
  // (grad_student, grad_teacher) of grad_loss * loss from the saved coefficients.
  m.def(
      "pcc_mse_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor coeffs, int norm, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // out[r] = features[level_r][batch_r, :, y_r, x_r] for index rows [level, batch, y, x];
  // rows out of range give zeros. (R,C) in the features' dtype.
  m.def("gather_level_features_fwd(Tensor[] features, Tensor index) -> Tensor");
  // Adjoint: one (N,C,H,W) map per level (sizes = (N,C,H,W) per level, flattened), rows summed per
  // destination in a fixed order (deterministic, no atomics); out-of-range rows dropped.
  m.def("gather_level_features_bwd(Tensor grad, Tensor index, SymInt[] sizes) -> Tensor[]");
  // RoIAlign over FPN levels (mmdet's SingleRoIExtractor over mmcv's RoIAlign, average mode):
  // out[r] (C,out_h,out_w) pooled from features[levels[r]] of image int(rois[r,0]) with spatial
  // scale scales[level]; rois (R,5) [batch, x1, y1, x2, y2] in the features' dtype, levels (R,)
  // int64. Bins average a sampling_ratio^2 grid of bilinear samples (0: ceil(roi size / out size)
  // per axis, as mmcv); aligned shifts by half a pixel. Rows whose level or image is out of range
  // are zero. Accumulates in float32 (float64 for float64).
  m.def(
      "roi_align_fwd(Tensor[] features, Tensor rois, Tensor levels, float[] scales, int out_h, int out_w, "
      "int sampling_ratio, bool aligned) -> Tensor");
  // Adjoint w.r.t. the features: one (N,C,H,W) map per level (sizes = (N,C,H,W) per level,
  // flattened); deterministic (a fixed summation order per destination plane, no atomics on the CPU).
  m.def(
      "roi_align_bwd(Tensor grad, Tensor rois, Tensor levels, float[] scales, int sampling_ratio, bool aligned, "
      "SymInt[] sizes) -> Tensor[]");
  // Image boxes (K,4) xyxy -> (L,K,4) int64 inclusive feature-pixel ranges [x_lo, y_lo, x_hi, y_hi]
  // of L levels (heights, widths, strides one per level) under rule "center" | "lgd" | "fgd"
  // (kdops.box_ranges). Image size: image_hw (K,2) (height, width) per box, or image_h, image_w > 0,
  // or none (image_hw undefined, image_h = image_w = 0). clip: empty -> [1,1,0,0], else clipped to
  // the map; no clip: NaN -> 0, clamped to +-2^40. Bitwise the tensor ops of kdops/ops/box_ranges.py.
  m.def(
      "box_ranges_fwd(Tensor boxes, int[] heights, int[] widths, float[] strides, str rule, Tensor? image_hw, "
      "float image_h, float image_w, bool clip) -> Tensor");
  // All L levels in one call. ranges (L,K,4) int64 inclusive [x_lo, y_lo, x_hi, y_hi] in each
  // level's pixels, batch_index (K,) int64. out[l,k,c] = sum of features[l][b_k, c] over the
  // range (divided by max(count,1) when mean): (L,K,C), O(N*C*H*W + K*C) per level.
  m.def("box_pool_fwd(Tensor[] features, Tensor ranges, Tensor batch_index, bool mean) -> Tensor");
  // Adjoint of box_pool_fwd: out[l][n,c,y,x] = sum over boxes k of image n covering (y,x) on level l
  // of values[l,k,c] (/count when mean). values (L,K,C) (any strides: a (K,C) expanded over L is
  // read in place), sizes = (N,H,W) per level, flattened; returns L maps (N,C,H_l,W_l).
  m.def(
      "box_paint_fwd(Tensor values, Tensor ranges, Tensor batch_index, SymInt[] sizes, bool mean) -> Tensor[]");
  // FGD's foreground mask: out[n,y,x] = max(0, max of weight[k] over the boxes k of image n whose
  // inclusive range [x0,x1]x[y0,y1] (ranges (K,4) int64 [x_lo, y_lo, x_hi, y_hi]) covers (y,x)),
  // (N,H,W) in `dtype`. weight (K,) float64; boxes with weight <= 0, empty ranges or batch index
  // outside [0,N) are skipped, ranges are clipped. Exact (a max), deterministic; not differentiable.
  m.def(
      "box_masks_fwd(Tensor ranges, Tensor weight, Tensor batch_index, SymInt N, SymInt H, SymInt W, "
      "ScalarType dtype) -> Tensor");
  // Greedy NMS per group, fixed-shape output (kdops.nms_mask): boxes (G,K,4) x1,y1,x2,y2 (any float
  // dtype, read as float64), each group's candidates in priority order; valid (G,K) bool. Returns keep
  // (G,K) bool: keep[g,i] = valid[g,i] and no j < i has keep[g,j] and IoU(j,i) > iou_threshold, IoU in
  // float64 with torchvision's CPU nms formula term for term (std::max/std::min argument order:
  // NaN coordinates and 0/0 suppress nothing). Not differentiable.
  m.def("nms_mask_fwd(Tensor boxes, Tensor valid, float iou_threshold) -> Tensor");
  // General masks. feature (N,C,H,W), masks (K,H,W) in the feature's dtype, batch_index (K,)
  // int64: out[k,c] = sum_{y,x} masks[k,y,x] * feature[b_k,c,y,x], (K,C); objects whose b_k is
  // outside [0,N) give 0. One GEMM per image over its objects: O(K*C*H*W), no (N,C,K) product.
  m.def("mask_pool_fwd(Tensor feature, Tensor masks, Tensor batch_index) -> Tensor");
  // (grad_feature (N,C,H,W), grad_masks (K,H,W)) of <grad, out>:
  // grad_feature[n] = sum_{k: b_k = n} grad[k,:]^T masks[k]; grad_masks[k] = sum_c grad[k,c] feature[b_k,c].
  // Deterministic (per-image segments in a fixed order, no atomics).
  m.def(
      "mask_pool_bwd(Tensor grad, Tensor feature, Tensor masks, Tensor batch_index, bool grad_feature, "
      "bool grad_masks) -> (Tensor, Tensor)");
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
  // grads[i] *= factors[i] in place (CPU): loss ops whose gradient is computed in the forward
  // pass scale it with the incoming gradient in backward. The storage of a dense tensor is
  // scaled whatever its strides.
  m.def("scale_grads_(Tensor(a!)[] grads, float[] factors) -> ()");
  // BCKD classification: loss = scale * sum_a w_a sum_k BCE(s, sigmoid(t)) |sigmoid(t) - sigmoid(s)|^beta
  // over (N,H,W,J,K) strided views (mmdet's (N,J*K,H,W) or (A,K) without a copy).
  // returns (loss, grad_student, grad_weight)
  m.def(
      "bckd_cls_loss_fwd(Tensor student, Tensor teacher, Tensor? weight, float beta, float scale, "
      "bool grad_student, bool grad_weight) -> (Tensor, Tensor, Tensor)");
  // BCKD localisation, every FPN level in one call (one parallel region, one autograd node):
  // loss[l] = scale[l] * sum_a max_k|sigmoid(tl) - sigmoid(sl)| w_a (1 - GIoU(dec(sr), dec(tr)))
  // per level l. Regression (A,D) or mmdet's (N,J*D,H,W), logits (A,K) or (N,J*K,H,W) in the
  // same layout, read in place through their strides; D = 4 (decoder 0 distance, 2 DeltaXYWH)
  // or 4*(reg_max+1) (1 GFL integral); loss 0 GIoU, 1 IoU (linear). priors (M,4) anchors or
  // (M,2) points, M dividing A; weight and stride (per-anchor strides) hold A values or are
  // None; stride_value > 0 divides the points (0: no stride). Priors, weights and strides are
  // read in the accumulation dtype.
  // returns (loss (L,), grad_student_reg per level (input's shape), grad_weight per level
  // (weight's shape and dtype)); a gradient not asked for is an empty tensor.
  m.def(
      "bckd_loc_loss_fwd(Tensor[] student_reg, Tensor[] teacher_reg, Tensor[] student_logits, "
      "Tensor[] teacher_logits, Tensor[] priors, Tensor?[] weight, Tensor?[] stride, float[] stride_value, "
      "int decoder, int loss, int reg_max, float[] means, float[] stds, float max_ratio, float[] scale, "
      "bool grad_reg, bool grad_weight) -> (Tensor, Tensor[], Tensor[])");
}

// `import kdops._C` loads this library, which runs the registrations above.
static struct PyModuleDef kdops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kdops_module); }
