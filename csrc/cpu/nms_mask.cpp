// CPU kernel of kdops::nms_mask_fwd: exact greedy NMS per group with a fixed-shape keep mask.
//
//   keep[g,i] = valid[g,i] and no j < i has keep[g,j] and IoU(box[g,j], box[g,i]) > iou_threshold
//
// The loop is torchvision's nms_kernel_impl (csrc/ops/cpu/nms_kernel.cpp) on each group's boxes in
// the given order, term for term in float64: area = (x2-x1)*(y2-y1); for a kept box i and a later
// box j, xx1 = std::max(x1_i, x1_j), yy1 = std::max(y1_i, y1_j), xx2 = std::min(x2_i, x2_j),
// yy2 = std::min(y2_i, y2_j), w = std::max(0, xx2-xx1), h = std::max(0, yy2-yy1), inter = w*h,
// iou = inter / (area_i + area_j - inter), j suppressed iff iou > iou_threshold. The argument order
// of std::max/std::min is torchvision's, which fixes what a NaN coordinate does (std::max(a, b) is
// a unless a < b: a NaN in the second argument is dropped, one in the first kept); a NaN iou
// (0/0 of two empty boxes, inf-inf of infinite ones) is not > the threshold and suppresses nothing.
// Invalid candidates start out suppressed: never kept, so they suppress nothing.
//
// Differences from torchvision that change no result: the values are widened to float64 first
// (torchvision computes in the input's float type; float64 inputs give the same numbers), and the
// inner loop (nms_mask_kernel.h, compiled per instruction set by multi_isa.h) runs over every later j
// without torchvision's "skip j if already suppressed" branch (it only ORs a flag that is already
// set), which lets it vectorise: 4 (AVX2) or 8 (AVX-512) IoUs a step.
//
// One task per block of groups (at::parallel_for); a group is handled by one thread start to end, so
// the result does not depend on the thread count. Every read is inside the (G,K,4) / (G,K) inputs
// for any values; not differentiable.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

#define KDOPS_KERNEL "nms_mask_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

// The group's boxes as float64 columns, and its suppression flags (1 = suppressed or invalid):
// 64-bit flags, as wide as the doubles, so that the inner loop vectorises (GCC does not mix
// double and byte lanes).
struct GroupScratch {
  std::vector<double> x1, y1, x2, y2, area;
  std::vector<int64_t> sup;
  void resize(int64_t K) {
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->resize(K);
    sup.resize(K);
  }
};

template <typename scalar_t>
void nms_group(const scalar_t* b, const bool* valid, bool* keep, int64_t K, double thr, GroupScratch& s) {
  double *x1 = s.x1.data(), *y1 = s.y1.data(), *x2 = s.x2.data(), *y2 = s.y2.data(), *area = s.area.data();
  int64_t* sup = s.sup.data();
  for (int64_t k = 0; k < K; ++k) {
    x1[k] = static_cast<double>(b[4 * k]);
    y1[k] = static_cast<double>(b[4 * k + 1]);
    x2[k] = static_cast<double>(b[4 * k + 2]);
    y2[k] = static_cast<double>(b[4 * k + 3]);
    area[k] = (x2[k] - x1[k]) * (y2[k] - y1[k]);
    sup[k] = valid[k] ? 0 : 1;
    keep[k] = false;
  }
  const auto suppress_after = KDOPS_ISA_PICK(suppress_after);
  for (int64_t i = 0; i < K; ++i) {
    if (sup[i]) continue;
    keep[i] = true;
    suppress_after(x1, y1, x2, y2, area, sup, i, K, thr);
  }
}

at::Tensor nms_mask_fwd_cpu(const at::Tensor& boxes, const at::Tensor& valid, double iou_threshold) {
  const char* op = "kdops::nms_mask_fwd";
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(2) == 4, op, ": boxes must be (G,K,4) x1, y1, x2, y2, got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating, got ", boxes.scalar_type());
  const int64_t G = boxes.size(0), K = boxes.size(1);
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == G && valid.size(1) == K && valid.scalar_type() == at::kBool, op,
              ": valid must be (G,K) = (", G, ",", K, ") bool, got ", valid.sizes(), " ", valid.scalar_type());
  TORCH_CHECK(valid.device() == boxes.device(), op, ": valid is on ", valid.device(), " but boxes on ",
              boxes.device());
  auto keep = at::empty({G, K}, boxes.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const auto bx = boxes.contiguous();
  const auto vd = valid.contiguous();
  const bool* vp = vd.data_ptr<bool>();
  bool* kp = keep.data_ptr<bool>();
  // a group costs up to K^2/2 IoUs: small groups are taken ~65536/K^2 at a time
  const int64_t grain = K >= 256 ? 1 : std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bx.scalar_type(), "nms_mask_fwd", [&] {
    const scalar_t* bp = bx.data_ptr<scalar_t>();
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      GroupScratch s;
      s.resize(K);
      for (int64_t g = g0; g < g1; ++g)
        nms_group<scalar_t>(bp + g * K * 4, vp + g * K, kp + g * K, K, iou_threshold, s);
    });
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("nms_mask_fwd", &nms_mask_fwd_cpu); }

}  // namespace kdops
