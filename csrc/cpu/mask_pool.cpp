// CPU kernels of kdops::mask_pool_fwd and kdops::mask_pool_bwd.
//
// out[k,c] = sum_{y,x} M[k,y,x] F[b_k,c,y,x] is, per image n, a GEMM over the objects of
// that image: out[K_n] = M[K_n] (K_n,HW) @ F[n]^T (HW,C). The backward is two more GEMMs per
// image: grad_F[n] = g[K_n]^T @ M[K_n] and grad_M[K_n] = g[K_n] @ F[n]. The objects are
// bucketed by image on the host (CPU tensors: reading batch_index costs no device sync), so
// no (N,C,K) product is formed (LGD's aggregate_per_level does the same torch.mm per image,
// with a Python loop and a host-side split).
// Instance masks are zero outside their object's box, so the forward and grad_F run per band
// of whole rows (~2048 pixels) over only the objects whose mask has a nonzero row in the band
// (each mask's first and last nonzero rows are found first, scanning from both ends): the
// cost is O(C * sum of the objects' row spans * W) instead of O(K*C*H*W), and bands that no
// mask meets are never read (forward) and written as exact zeros (grad_F). grad_M is dense
// (it is nonzero outside the masks too) and stays one GEMM per image.
// - An image's objects are a slice of the inputs when they are consecutive (the usual
//   layout: objects sorted by image); otherwise their rows are gathered (index_select).
// - float16/bfloat16: the GEMMs run in float32 on bands (grad_M: blocks of kHwBlock pixels)
//   cast up, then the result is cast down once; only O((C + K_n) * kHwBlock) floats are live.
//   float32 and float64 run the GEMMs in their own type.
// - A band is multiplied only with the masks that meet it: a NaN or Inf of the map in a band
//   reaches those objects' results (0 * Inf is NaN there, as in the dense product) and no
//   other's, where the dense product would spread it to every object of the image.
// - Objects whose batch index is outside [0,N) pool to 0 and get a zero mask gradient; they
//   are never read from or written to the feature map.
// - Deterministic: a fixed loop over images and bands, BLAS GEMMs (fixed reduction order for
//   a given thread count), partial sums added in band order, no atomics.
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

// The rows [y0[k], y1[k]) that hold every nonzero value of object k's mask (y0 = y1 when the
// mask is zero). Each mask is scanned from the top to its first nonzero row and from the
// bottom to its last: the rows between are not read. NaN counts as nonzero (it propagates).
std::vector<int64_t> mask_row_extents(const at::Tensor& Mc, int64_t H, int64_t W) {
  const int64_t K = Mc.size(0);
  std::vector<int64_t> ext(2 * K, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Mc.scalar_type(), "mask_row_extents", [&] {
    const scalar_t* mp = Mc.data_ptr<scalar_t>();
    const auto row_nonzero = [&](const scalar_t* r) {
      bool nz = false;
      for (int64_t x = 0; x < W; ++x) nz |= !(static_cast<float>(r[x]) == 0.0f);
      return nz;
    };
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* m = mp + k * H * W;
        int64_t top = 0, bottom = H;
        while (top < H && !row_nonzero(m + top * W)) ++top;
        if (top == H) continue;  // a zero mask: pools to exactly 0
        while (bottom > top + 1 && !row_nonzero(m + (bottom - 1) * W)) --bottom;
        ext[2 * k] = top;
        ext[2 * k + 1] = bottom;
      }
    });
  });
  return ext;
}

// Row bands of one image: [r0, r1) and the image's objects (local indices into the group) whose
// mask rows meet the band. Objects are instance masks, nonzero inside their box only, so a
// band meets a fraction of them: the GEMMs below run per band over those objects alone
// (a zero mask row contributes exactly 0 to the forward and to grad_F).
constexpr int64_t kBandPixels = 2048;  // pixels per band (whole rows): GEMM operands stay in L2

struct Band {
  int64_t r0, r1;
  std::vector<int64_t> objs;  // local indices, increasing
};

std::vector<Band> bands_of(const Group& g, const std::vector<int64_t>& ext, int64_t H, int64_t W) {
  const int64_t B = std::max<int64_t>(1, std::min<int64_t>(H, kBandPixels / std::max<int64_t>(W, 1)));
  std::vector<Band> bands;
  for (int64_t r0 = 0; r0 < H; r0 += B) {
    Band b{r0, std::min(H, r0 + B), {}};
    for (int64_t i = 0; i < g.size(); ++i) {
      const int64_t k = g.ks[i];
      if (ext[2 * k] < b.r1 && ext[2 * k + 1] > b.r0) b.objs.push_back(i);
    }
    bands.push_back(std::move(b));
  }
  return bands;
}

// Rows `objs` of the (K_n, HW) matrix Mn over pixels [p0, p0 + len), in `dtype`: a view when
// the band meets every object of a run, else a gathered copy.
at::Tensor band_rows(const at::Tensor& Mn, const Band& b, int64_t n_all, int64_t p0, int64_t len,
                     at::ScalarType dtype) {
  at::Tensor cols = Mn.narrow(1, p0, len);
  if (int64_t(b.objs.size()) != n_all) {
    const auto idx = at::tensor(b.objs, Mn.options().dtype(at::kLong));
    cols = cols.index_select(0, idx);
  }
  return cols.scalar_type() == dtype ? cols : cols.to(dtype);
}

at::Tensor mask_pool_fwd_cpu(const at::Tensor& feature, const at::Tensor& masks, const at::Tensor& batch_index) {
  const char* op = "kdops::mask_pool_fwd";
  check_inputs(feature, masks, batch_index, op);
  const int64_t N = feature.size(0), C = feature.size(1), H = feature.size(2), W = feature.size(3), HW = H * W;
  const int64_t K = masks.size(0);
  auto out = at::zeros({K, C}, feature.options());
  if (K == 0 || C == 0 || HW == 0 || N == 0) return out;
  bool all_valid;
  const auto groups = group_by_image(batch_index, N, &all_valid);
  const at::Tensor Mc = masks.contiguous();
  const at::Tensor M = Mc.view({K, HW});
  const auto ext = mask_row_extents(Mc, H, W);
  const bool low = is_low_precision(feature);
  const auto acc_type = low ? at::kFloat : feature.scalar_type();
  for (int64_t n = 0; n < N; ++n) {
    const Group& g = groups[n];
    if (g.ks.empty()) continue;
    const at::Tensor Fn = image_matrix(feature, n);  // (C,HW)
    const at::Tensor Mn = g.rows(M);                 // (K_n,HW)
    auto acc = at::zeros({g.size(), C}, feature.options().dtype(acc_type));
    for (const Band& b : bands_of(g, ext, H, W)) {
      if (b.objs.empty()) continue;
      const int64_t p0 = b.r0 * W, len = (b.r1 - b.r0) * W;
      const at::Tensor Mb = band_rows(Mn, b, g.size(), p0, len, acc_type);
      at::Tensor Fb = Fn.narrow(1, p0, len);
      if (low) Fb = Fb.to(at::kFloat);
      if (int64_t(b.objs.size()) == g.size()) {
        acc.addmm_(Mb, Fb.t());
      } else {
        acc.index_add_(0, at::tensor(b.objs, batch_index.options()), at::mm(Mb, Fb.t()));
      }
    }
    write_rows(out, g, acc.scalar_type() == out.scalar_type() ? acc : acc.to(out.scalar_type()));
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
  // grad_F: every band of every plane is written below (zeros where no mask is nonzero).
  at::Tensor gF = grad_feature ? at::empty({N, C, H, W}, feature.options()) : no_grad_placeholder(feature);
  // grad_M: rows of objects with an image are written whole below; the others stay 0.
  const bool rows_written = all_valid && C > 0 && HW > 0;
  at::Tensor gM = grad_masks ? (rows_written ? at::empty({K, H, W}, masks.options()) : at::zeros({K, H, W}, masks.options()))
                             : no_grad_placeholder(masks);
  if (!grad_feature && !grad_masks) return {gF, gM};
  const bool low = is_low_precision(feature);
  const auto acc_type = low ? at::kFloat : feature.scalar_type();
  const at::Tensor Mc = masks.contiguous();
  const at::Tensor M = Mc.view({K, HW});
  const at::Tensor gM2 = grad_masks ? gM.view({K, HW}) : gM;
  const at::Tensor g = grad.contiguous();
  const std::vector<int64_t> ext = grad_feature && HW > 0 ? mask_row_extents(Mc, H, W) : std::vector<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const Group& grp = groups[n];
    if (grp.ks.empty() || C == 0 || HW == 0) {
      if (grad_feature) gF.select(0, n).zero_();
      continue;
    }
    const at::Tensor Fn = image_matrix(feature, n);  // (C,HW)
    const at::Tensor Mn = grp.rows(M);               // (K_n,HW)
    const at::Tensor gn = grp.rows(g);               // (K_n,C)
    if (grad_feature) {
      // grad_F[n] = g[K_n]^T @ M[K_n], band by band over the objects that meet the band
      const at::Tensor gFn = gF.select(0, n).view({C, HW});
      const at::Tensor gn_acc = gn.to(acc_type);
      for (const Band& b : bands_of(grp, ext, H, W)) {
        const int64_t p0 = b.r0 * W, len = (b.r1 - b.r0) * W;
        at::Tensor dst = gFn.narrow(1, p0, len);
        if (b.objs.empty()) {
          dst.zero_();
          continue;
        }
        const bool all = int64_t(b.objs.size()) == grp.size();
        const at::Tensor gb = all ? gn_acc : gn_acc.index_select(0, at::tensor(b.objs, batch_index.options()));
        const at::Tensor Mb = band_rows(Mn, b, grp.size(), p0, len, acc_type);
        if (low) {
          dst.copy_(at::mm(gb.t(), Mb));
        } else {
          at::mm_out(dst, gb.t(), Mb);
        }
      }
    }
    if (!grad_masks) continue;
    // grad_M[K_n] = g[K_n] @ F[n]: dense (nonzero outside the masks too)
    if (!low) {
      if (grp.is_run()) {
        auto dst = gM2.narrow(0, grp.ks.front(), grp.size());
        at::mm_out(dst, gn, Fn);
      } else {
        write_rows(gM2, grp, at::mm(gn, Fn));
      }
      continue;
    }
    const at::Tensor gn32 = gn.to(at::kFloat);
    for (int64_t s = 0; s < HW; s += kHwBlock) {
      const int64_t len = std::min(kHwBlock, HW - s);
      write_rows(gM2.narrow(1, s, len), grp, at::mm(gn32, Fn.narrow(1, s, len).to(at::kFloat)));
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
