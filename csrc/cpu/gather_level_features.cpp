// CPU kernels of kdops::gather_level_features_fwd / _bwd.
//
// Forward: one task per block of rows copies each row's (C,) column, reading the levels
// through their strides (no contiguous copies). Out-of-range rows read nothing.
// Backward: rows are sorted (stable) by destination (level, image, pixel) and the work is
// split by output plane (level, image, channel): a task writes every destination of its
// plane once, in address order, the sum of its rows in row order in accumulation
// precision -- no atomics, bitwise identical results for any thread count. Each task also
// zero-fills its plane just before, so the dense gradient is written once, while in cache
// (that one pass over the levels dominates the backward's time).
// Out-of-range rows are dropped.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

// Rows sorted by destination, grouped into runs of equal destination, and the range of
// runs of every (level, image) block.
struct SortedRows {
  std::vector<int64_t> order;      // valid rows, sorted by key (stable)
  std::vector<int64_t> run_start;  // start of each run of equal key in `order` (+ end)
  std::vector<int64_t> run_pixel;  // y*W + x of each run
  std::vector<int64_t> block;      // runs of block b = level_base[l] + n: [block[b], block[b+1])
  std::vector<int64_t> level_base;

  SortedRows(const int64_t* ip, int64_t R, const std::vector<int64_t>& N, const std::vector<int64_t>& H,
             const std::vector<int64_t>& W) {
    const int64_t L = static_cast<int64_t>(N.size());
    int64_t blocks = 0;
    for (int64_t l = 0; l < L; ++l) {
      level_base.push_back(blocks);
      blocks += N[l];
    }
    std::vector<int64_t> key(R, -1);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t l = ip[4 * r], n = ip[4 * r + 1], y = ip[4 * r + 2], x = ip[4 * r + 3];
      if (l < 0 || l >= L || n < 0 || n >= N[l] || y < 0 || y >= H[l] || x < 0 || x >= W[l]) continue;
      // block-major key; pixels < 2^40 per plane
      key[r] = ((level_base[l] + n) << 40) + y * W[l] + x;
      order.push_back(r);
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    block.assign(blocks + 1, 0);
    for (size_t i = 0; i < order.size(); ++i) {
      const int64_t k = key[order[i]];
      if (i == 0 || k != key[order[i - 1]]) {
        run_start.push_back(static_cast<int64_t>(i));
        run_pixel.push_back(k & ((int64_t(1) << 40) - 1));
        block[(k >> 40) + 1] += 1;
      }
    }
    run_start.push_back(static_cast<int64_t>(order.size()));
    for (int64_t b = 0; b < blocks; ++b) block[b + 1] += block[b];
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
  const int64_t R = idx.size(0), C = f0.size(1);
  std::vector<int64_t> N, H, W;
  for (const auto& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(1) == C && f.scalar_type() == f0.scalar_type(), op,
                ": levels must be (N,C,H,W) with one C and one dtype");
    N.push_back(f.size(0)); H.push_back(f.size(2)); W.push_back(f.size(3));
  }
  auto out = at::zeros({R, C}, f0.options());
  if (R == 0 || C == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t L = static_cast<int64_t>(N.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gather_level_features_fwd", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = ip[4 * r], n = ip[4 * r + 1], y = ip[4 * r + 2], x = ip[4 * r + 3];
        if (l < 0 || l >= L || n < 0 || n >= N[l] || y < 0 || y >= H[l] || x < 0 || x >= W[l]) continue;
        const auto& f = features[l];
        const scalar_t* p = f.data_ptr<scalar_t>() + n * f.stride(0) + y * f.stride(2) + x * f.stride(3);
        const int64_t sc = f.stride(1);
        // one cache line per channel, a plane apart: prefetch a few channels ahead, which the
        // hardware prefetchers do not do for page-crossing strides (only channels that exist)
        for (int64_t c = 0; c < C; ++c) {
          if (c + 16 < C) __builtin_prefetch(p + (c + 16) * sc);
          o[r * C + c] = p[c * sc];
        }
      }
    });
  });
  return out;
}

std::vector<at::Tensor> gather_bwd_cpu(const at::Tensor& grad, const at::Tensor& index, c10::SymIntArrayRef sizes_) {
  const char* op = "kdops::gather_level_features_bwd";
  const auto idx = check_index(index, op);
  const auto sizes = C10_AS_INTARRAYREF_SLOW(sizes_);
  TORCH_CHECK(!sizes.empty() && sizes.size() % 4 == 0, op, ": sizes must hold 4 sizes per level");
  const int64_t L = sizes.size() / 4, R = idx.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == R, op, ": grad must be (R,C)");
  const int64_t C = grad.size(1);
  std::vector<int64_t> N, H, W;
  std::vector<at::Tensor> outs;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(sizes[4 * l + 1] == C, op, ": every level must have the C of grad");
    N.push_back(sizes[4 * l]); H.push_back(sizes[4 * l + 2]); W.push_back(sizes[4 * l + 3]);
    outs.push_back(at::empty({N[l], C, H[l], W[l]}, grad.options()));  // every plane is filled below
  }
  const auto gc = grad.contiguous();
  const SortedRows s(idx.data_ptr<int64_t>(), R, N, H, W);
  std::vector<std::array<int64_t, 3>> planes;  // (level, image, channel)
  const int64_t n_max = *std::max_element(N.begin(), N.end());
  for (int64_t n = 0; n < n_max; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t l = 0; l < L; ++l)
        if (n < N[l]) planes.push_back({l, n, c});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "gather_level_features_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* g = gc.data_ptr<scalar_t>();
    // planes of different levels differ in size ~60x: the plane list interleaves the levels
    // ((n, c) outer, level inner), so every contiguous share of it that at::parallel_for hands
    // a thread holds the same mix of large and small planes
    at::parallel_for(0, int64_t(planes.size()), L, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [l, n, c] = planes[t];
        const int64_t HW = H[l] * W[l];
        scalar_t* plane = outs[l].data_ptr<scalar_t>() + (n * C + c) * HW;
        std::fill(plane, plane + HW, scalar_t(0));  // zeroed here: the plane is still in cache for its rows
        const int64_t b = s.level_base[l] + n;
        for (int64_t run = s.block[b]; run < s.block[b + 1]; ++run) {
          acc sum = 0;
          for (int64_t i = s.run_start[run]; i < s.run_start[run + 1]; ++i) sum += acc(g[s.order[i] * C + c]);
          plane[s.run_pixel[run]] = static_cast<scalar_t>(sum);
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
