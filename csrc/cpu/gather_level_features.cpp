// CPU kernels of kdops::gather_level_features_fwd / _bwd.
//
// Forward copies one (C,) column per index row, reading the levels through their
// strides (no contiguous copies of the feature maps). Backward sorts the valid rows by
// destination (stable, so rows of one destination keep their order), then each
// destination -- a run of equal keys -- is owned by one task that sums its rows in
// accumulation precision and writes once: no atomics, bitwise identical results for
// any thread count. Out-of-range rows read nothing and write nothing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct LevelGeom {
  std::vector<int64_t> N, C, H, W;
  int64_t L() const { return static_cast<int64_t>(N.size()); }
  // Flat destination (n*H + y)*W + x of an index row, or -1 when it is out of range.
  int64_t pixel(const int64_t* row) const {
    const int64_t l = row[0], n = row[1], y = row[2], x = row[3];
    if (l < 0 || l >= L() || n < 0 || n >= N[l] || y < 0 || y >= H[l] || x < 0 || x >= W[l]) return -1;
    return (n * H[l] + y) * W[l] + x;
  }
};

at::Tensor check_index(const at::Tensor& index, const char* op) {
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 4 && index.scalar_type() == at::kLong,
              op, ": index must be an (R,4) int64 tensor");
  return index.contiguous();
}

at::Tensor gather_fwd_cpu(at::TensorList features, const at::Tensor& index) {
  const char* op = "kdops::gather_level_features_fwd";
  TORCH_CHECK(!features.empty(), op, ": needs at least one level");
  const auto idx = check_index(index, op);
  const auto& f0 = features[0];
  const int64_t L = features.size(), R = idx.size(0), C = f0.size(1);
  LevelGeom g;
  for (const auto& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(1) == C && f.scalar_type() == f0.scalar_type(), op,
                ": levels must be (N,C,H,W) with one C and one dtype");
    g.N.push_back(f.size(0)); g.C.push_back(C); g.H.push_back(f.size(2)); g.W.push_back(f.size(3));
  }
  auto out = at::zeros({R, C}, f0.options());
  if (R == 0 || C == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gather_level_features_fwd", [&] {
    std::vector<const scalar_t*> base(L);
    for (int64_t l = 0; l < L; ++l) base[l] = features[l].data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t* row = ip + 4 * r;
        if (g.pixel(row) < 0) continue;
        const auto& f = features[row[0]];
        const scalar_t* p = base[row[0]] + row[1] * f.stride(0) + row[2] * f.stride(2) + row[3] * f.stride(3);
        const int64_t sc = f.stride(1);
        for (int64_t c = 0; c < C; ++c) op_[r * C + c] = p[c * sc];
      }
    });
  });
  return out;
}

std::vector<at::Tensor> gather_bwd_cpu(const at::Tensor& grad, const at::Tensor& index, c10::SymIntArrayRef shapes_) {
  const char* op = "kdops::gather_level_features_bwd";
  const auto idx = check_index(index, op);
  const auto shapes = C10_AS_INTARRAYREF_SLOW(shapes_);
  TORCH_CHECK(!shapes.empty() && shapes.size() % 4 == 0, op, ": shapes must hold 4 sizes per level");
  const int64_t L = shapes.size() / 4, R = idx.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == R, op, ": grad must be (R,C)");
  const int64_t C = grad.size(1);
  LevelGeom g;
  std::vector<at::Tensor> outs;
  int64_t max_pix = 1;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(shapes[4 * l + 1] == C, op, ": every level must have the C of grad");
    g.N.push_back(shapes[4 * l]); g.C.push_back(C); g.H.push_back(shapes[4 * l + 2]); g.W.push_back(shapes[4 * l + 3]);
    max_pix = std::max(max_pix, g.N[l] * g.H[l] * g.W[l]);
    outs.push_back(at::zeros({g.N[l], C, g.H[l], g.W[l]}, grad.options()));
  }
  if (R == 0 || C == 0) return outs;
  const auto gc = grad.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  // key = level * max_pix + pixel; stable sort keeps the row order within a destination.
  std::vector<int64_t> key(R), order;
  order.reserve(R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t pix = g.pixel(ip + 4 * r);
    key[r] = pix < 0 ? -1 : ip[4 * r] * max_pix + pix;
    if (pix >= 0) order.push_back(r);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  std::vector<int64_t> seg;  // start of each run of equal keys in `order`
  for (size_t i = 0; i < order.size(); ++i)
    if (i == 0 || key[order[i]] != key[order[i - 1]]) seg.push_back(static_cast<int64_t>(i));
  seg.push_back(static_cast<int64_t>(order.size()));
  const int64_t S = static_cast<int64_t>(seg.size()) - 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "gather_level_features_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    std::vector<scalar_t*> base(L);
    for (int64_t l = 0; l < L; ++l) base[l] = outs[l].data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t first = order[seg[s]];
        const int64_t l = ip[4 * first], n = ip[4 * first + 1];
        const int64_t HW = g.H[l] * g.W[l];
        const int64_t yx = ip[4 * first + 2] * g.W[l] + ip[4 * first + 3];
        scalar_t* dst = base[l] + n * C * HW + yx;
        for (int64_t c = 0; c < C; ++c) {
          acc sum = 0;
          for (int64_t i = seg[s]; i < seg[s + 1]; ++i) sum += acc(gp[order[i] * C + c]);
          dst[c * HW] = static_cast<scalar_t>(sum);
        }
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("gather_level_features_fwd", &gather_fwd_cpu);
  m.impl("gather_level_features_bwd", &gather_bwd_cpu);
}

}  // namespace kdops
