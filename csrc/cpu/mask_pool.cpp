// CPU kernels of kdops::mask_pool_fwd and kdops::mask_pool_bwd.
//
// out[k,c] = sum_{y,x} M[k,y,x] F[b_k,c,y,x] is, per image n, one GEMM over the objects of
// that image: out[K_n] = M[K_n] (K_n,HW) @ F[n]^T (HW,C). The backward is two more GEMMs per
// image: grad_F[n] = g[K_n]^T @ M[K_n] and grad_M[K_n] = g[K_n] @ F[n]. The objects are
// bucketed by image on the host (CPU tensors: reading batch_index costs no device sync), so
// the cost is O(K*C*H*W) and no (N,C,K) product is formed (LGD's aggregate_per_level does the
// same torch.mm per image, with a Python loop and a host-side split).
//
// - An image's objects are a slice of the inputs when they are consecutive (the usual
//   layout: objects sorted by image); otherwise their rows are gathered (index_select).
// - float16/bfloat16: the GEMMs run in float32 on blocks of kHwBlock pixels cast up, then
//   the result is cast down once; only O((C + K_n) * kHwBlock) floats are live. float32 and
//   float64 run the GEMM in their own type on the whole image.
// - Objects whose batch index is outside [0,N) pool to 0 and get a zero mask gradient; they
//   are never read from or written to the feature map.
// - Deterministic: a fixed loop over images and pixel blocks, BLAS GEMMs (fixed reduction
//   order for a given thread count), no atomics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

constexpr int64_t kHwBlock = 2048;  // pixels per float32 block for half/bfloat16

// The objects of one image, in object order.
struct Group {
  std::vector<int64_t> ks;
  at::Tensor index;  // int64 (K_n,) when the objects are not one consecutive run

  bool is_run() const { return ks.back() - ks.front() + 1 == static_cast<int64_t>(ks.size()); }
  int64_t size() const { return static_cast<int64_t>(ks.size()); }
  // Rows of t (objects on dim 0) of this group: a view for a run, a gathered copy otherwise.
  at::Tensor rows(const at::Tensor& t) const { return is_run() ? t.narrow(0, ks.front(), size()) : t.index_select(0, index); }
};

// Objects bucketed per image; `all_valid` tells whether every object has an image in [0,N).
std::vector<Group> group_by_image(const at::Tensor& batch_index, int64_t N, bool* all_valid) {
  const auto b = batch_index.contiguous();
  const int64_t* bp = b.data_ptr<int64_t>();
  std::vector<Group> groups(N);
  *all_valid = true;
  for (int64_t k = 0; k < b.numel(); ++k) {
    if (bp[k] < 0 || bp[k] >= N) {
      *all_valid = false;
      continue;
    }
    groups[bp[k]].ks.push_back(k);
  }
  for (auto& g : groups) {
    if (!g.ks.empty() && !g.is_run()) g.index = at::tensor(g.ks, b.options());
  }
  return groups;
}

// Image n of an (N,C,H,W) map as a (C,HW) matrix: a view for NCHW (and, transposed, for
// channels_last) layouts, a copy of that one image otherwise.
at::Tensor image_matrix(const at::Tensor& f, int64_t n) {
  const at::Tensor img = f.select(0, n);
  const int64_t C = img.size(0), HW = img.size(1) * img.size(2);
  if (img.is_contiguous()) return img.view({C, HW});
  const at::Tensor hwc = img.permute({1, 2, 0});
  if (hwc.is_contiguous()) return hwc.view({HW, C}).t();
  return img.contiguous().view({C, HW});
}

bool is_low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// dst (rows of an (K,...) tensor of group g) = src, for a run (view) or gathered rows.
void write_rows(const at::Tensor& dst, const Group& g, const at::Tensor& src) {
  if (g.is_run()) {
    dst.narrow(0, g.ks.front(), g.size()).copy_(src);
  } else {
    dst.index_copy_(0, g.index, src.to(dst.scalar_type()));
  }
}

void check_inputs(const at::Tensor& feature, const at::Tensor& masks, const at::Tensor& batch_index, const char* op) {
  TORCH_CHECK(feature.dim() == 4, op, ": feature must be (N,C,H,W)");
  TORCH_CHECK(masks.dim() == 3 && masks.size(1) == feature.size(2) && masks.size(2) == feature.size(3), op,
              ": masks must be (K,H,W) with the feature's H and W");
  TORCH_CHECK(masks.scalar_type() == feature.scalar_type(), op, ": masks must have the feature's dtype");
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == masks.size(0) && batch_index.scalar_type() == at::kLong,
              op, ": batch_index must be (K,) int64");
}

at::Tensor mask_pool_fwd_cpu(const at::Tensor& feature, const at::Tensor& masks, const at::Tensor& batch_index) {
  const char* op = "kdops::mask_pool_fwd";
  check_inputs(feature, masks, batch_index, op);
  const int64_t N = feature.size(0), C = feature.size(1), HW = feature.size(2) * feature.size(3);
  const int64_t K = masks.size(0);
  auto out = at::zeros({K, C}, feature.options());
  if (K == 0 || C == 0 || HW == 0 || N == 0) return out;
  bool all_valid;
  const auto groups = group_by_image(batch_index, N, &all_valid);
  const at::Tensor M = masks.reshape({K, HW});
  const bool low = is_low_precision(feature);
  for (int64_t n = 0; n < N; ++n) {
    const Group& g = groups[n];
    if (g.ks.empty()) continue;
    const at::Tensor Fn = image_matrix(feature, n);  // (C,HW)
    const at::Tensor Mn = g.rows(M);                 // (K_n,HW)
    if (!low) {
      if (g.is_run()) {
        auto dst = out.narrow(0, g.ks.front(), g.size());
        at::mm_out(dst, Mn, Fn.t());
      } else {
        write_rows(out, g, at::mm(Mn, Fn.t()));
      }
      continue;
    }
    auto acc = at::zeros({g.size(), C}, feature.options().dtype(at::kFloat));
    for (int64_t s = 0; s < HW; s += kHwBlock) {
      const int64_t len = std::min(kHwBlock, HW - s);
      acc.addmm_(Mn.narrow(1, s, len).to(at::kFloat), Fn.narrow(1, s, len).to(at::kFloat).t());
    }
    write_rows(out, g, acc.to(feature.scalar_type()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_pool_bwd_cpu(const at::Tensor& grad, const at::Tensor& feature,
                                                     const at::Tensor& masks, const at::Tensor& batch_index,
                                                     bool grad_feature, bool grad_masks) {
  const char* op = "kdops::mask_pool_bwd";
  check_inputs(feature, masks, batch_index, op);
  const int64_t N = feature.size(0), C = feature.size(1), H = feature.size(2), W = feature.size(3), HW = H * W;
  const int64_t K = masks.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == K && grad.size(1) == C, op, ": grad must be (K,C)");
  TORCH_CHECK(grad.scalar_type() == feature.scalar_type(), op, ": grad must have the feature's dtype");
  bool all_valid = true;
  const auto groups = group_by_image(batch_index, N, &all_valid);
  // grad_F: planes of images with objects are written whole below, the others zeroed.
  at::Tensor gF = grad_feature ? at::empty({N, C, H, W}, feature.options()) : no_grad_placeholder(feature);
  // grad_M: rows of objects with an image are written whole below; the others stay 0.
  const bool rows_written = all_valid && C > 0 && HW > 0;
  at::Tensor gM = grad_masks ? (rows_written ? at::empty({K, H, W}, masks.options()) : at::zeros({K, H, W}, masks.options()))
                             : no_grad_placeholder(masks);
  if (!grad_feature && !grad_masks) return {gF, gM};
  const bool low = is_low_precision(feature);
  const at::Tensor M = masks.reshape({K, HW});
  const at::Tensor gM2 = grad_masks ? gM.view({K, HW}) : gM;
  const at::Tensor g = grad.contiguous();
  for (int64_t n = 0; n < N; ++n) {
    const Group& grp = groups[n];
    if (grp.ks.empty() || C == 0 || HW == 0) {
      if (grad_feature) gF.select(0, n).zero_();
      continue;
    }
    const at::Tensor Fn = image_matrix(feature, n);  // (C,HW)
    const at::Tensor Mn = grp.rows(M);               // (K_n,HW)
    const at::Tensor gn = grp.rows(g);               // (K_n,C)
    at::Tensor gFn = grad_feature ? gF.select(0, n).view({C, HW}) : at::Tensor();
    if (!low) {
      if (grad_feature) at::mm_out(gFn, gn.t(), Mn);
      if (grad_masks) {
        if (grp.is_run()) {
          auto dst = gM2.narrow(0, grp.ks.front(), grp.size());
          at::mm_out(dst, gn, Fn);
        } else {
          write_rows(gM2, grp, at::mm(gn, Fn));
        }
      }
      continue;
    }
    const at::Tensor gn32 = gn.to(at::kFloat);
    for (int64_t s = 0; s < HW; s += kHwBlock) {
      const int64_t len = std::min(kHwBlock, HW - s);
      if (grad_feature) gFn.narrow(1, s, len).copy_(at::mm(gn32.t(), Mn.narrow(1, s, len).to(at::kFloat)));
      if (grad_masks) write_rows(gM2.narrow(1, s, len), grp, at::mm(gn32, Fn.narrow(1, s, len).to(at::kFloat)));
    }
  }
  return {gF, gM};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("mask_pool_fwd", &mask_pool_fwd_cpu);
  m.impl("mask_pool_bwd", &mask_pool_bwd_cpu);
}

}  // namespace kdops
