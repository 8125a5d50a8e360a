// CPU kernels of kdops::box_pool_fwd and its adjoint kdops::box_paint_fwd.
//
// Both work one (n,c) plane per task with a thread-local (H+1)x(W+1) float64 buffer:
// - pool builds the plane's summed-area table S (S[y][x] = sum of rows < y, cols < x),
//   then every box of image n reads 4 corners: O(H*W + boxes) per plane, whatever the
//   box areas. float64 keeps the corner differences exact to ~1e-16 relative to the
//   plane's total, also for fp32 maps of 100x152 (an fp32 table would lose ~1e-4).
// - paint adds each box's value at the 4 corners of a difference array in box order,
//   then one 2-D prefix sum writes the plane.
// Boxes are bucketed per image once (stable, in box order); each plane has one owner
// and a fixed summation order, so results are bitwise reproducible for any thread count.
// Ranges are clipped to the map here too, and boxes with an out-of-range batch index are
// skipped: no input reads or writes out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct Box {
  int64_t k, x0, y0, x1, y1;  // clipped inclusive range
};

// Non-empty clipped boxes grouped by image, in box order within an image.
std::vector<std::vector<Box>> boxes_per_image(const at::Tensor& ranges, const at::Tensor& batch_index,
                                              int64_t N, int64_t H, int64_t W, const char* op) {
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 4 && ranges.scalar_type() == at::kLong, op,
              ": ranges must be (K,4) int64");
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == ranges.size(0) &&
                  batch_index.scalar_type() == at::kLong,
              op, ": batch_index must be (K,) int64");
  const auto r = ranges.contiguous();
  const auto b = batch_index.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* bp = b.data_ptr<int64_t>();
  std::vector<std::vector<Box>> out(N);
  for (int64_t k = 0; k < r.size(0); ++k) {
    const int64_t n = bp[k];
    Box bx{k, std::max<int64_t>(rp[4 * k], 0), std::max<int64_t>(rp[4 * k + 1], 0),
           std::min<int64_t>(rp[4 * k + 2], W - 1), std::min<int64_t>(rp[4 * k + 3], H - 1)};
    if (n < 0 || n >= N || bx.x0 > bx.x1 || bx.y0 > bx.y1) continue;
    out[n].push_back(bx);
  }
  return out;
}

inline double box_count(const Box& b) { return double((b.x1 - b.x0 + 1) * (b.y1 - b.y0 + 1)); }

// 2-D prefix sums are split into a scan down the columns (independent across x, so it
// vectorises) and a scan along each row. The row scan is bound by the add latency, not
// by memory, so 8 rows run as 8 independent chains (8 adds in flight).

// In place: every row of `rows` rows (leading dimension ld) becomes its inclusive prefix sum.
inline void row_scan(double* buf, int64_t rows, int64_t n, int64_t ld) {
  constexpr int R = 8;
  int64_t y = 0;
  for (; y + R <= rows; y += R) {
    double* b = buf + y * ld;
    double run[R] = {};
    for (int64_t x = 0; x < n; ++x) {
      for (int r = 0; r < R; ++r) {
        run[r] += b[r * ld + x];
        b[r * ld + x] = run[r];
      }
    }
  }
  for (; y < rows; ++y) {
    double* b = buf + y * ld;
    double run = 0.0;
    for (int64_t x = 0; x < n; ++x) b[x] = run += b[x];
  }
}

// Pool: S row y+1 (from column 1) = S row y + feature row y; then row_scan gives the SAT.
template <typename scalar_t>
inline void col_accumulate(const scalar_t* src, int64_t stride, const double* above, double* dst, int64_t n) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) dst[x] = above[x] + double(src[x]);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = above[x] + double(src[x * stride]);
  }
}

// Paint: running column sums of the row-scanned difference array, written to the output row.
template <typename scalar_t>
inline void col_emit(const double* row, double* col, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) {
    col[x] += row[x];
    dst[x] = static_cast<scalar_t>(col[x]);
  }
}

at::Tensor box_pool_fwd_cpu(const at::Tensor& feature, const at::Tensor& ranges, const at::Tensor& batch_index,
                            bool mean) {
  const char* op = "kdops::box_pool_fwd";
  TORCH_CHECK(feature.dim() == 4, op, ": feature must be (N,C,H,W)");
  const int64_t N = feature.size(0), C = feature.size(1), H = feature.size(2), W = feature.size(3);
  const auto boxes = boxes_per_image(ranges, batch_index, N, H, W, op);
  auto out = at::zeros({ranges.size(0), C}, feature.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;
  const int64_t W1 = W + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "box_pool_fwd", [&] {
    const scalar_t* fp = feature.data_ptr<scalar_t>();
    const int64_t sN = feature.stride(0), sC = feature.stride(1), sH = feature.stride(2), sW = feature.stride(3);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> S((H + 1) * W1, 0.0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        if (boxes[n].empty()) continue;
        const scalar_t* p = fp + n * sN + c * sC;
        for (int64_t y = 0; y < H; ++y)  // row 0 and column 0 of S stay 0
          col_accumulate(p + y * sH, sW, S.data() + y * W1 + 1, S.data() + (y + 1) * W1 + 1, W);
        row_scan(S.data() + W1, H, W1, W1);
        for (const Box& b : boxes[n]) {
          const double* top = S.data() + b.y0 * W1;
          const double* bot = S.data() + (b.y1 + 1) * W1;
          double s = (bot[b.x1 + 1] - bot[b.x0]) - (top[b.x1 + 1] - top[b.x0]);
          if (mean) s /= box_count(b);
          op_[b.k * C + c] = static_cast<scalar_t>(s);
        }
      }
    });
  });
  return out;
}

at::Tensor box_paint_fwd_cpu(const at::Tensor& values, const at::Tensor& ranges, const at::Tensor& batch_index,
                             c10::SymInt N_, c10::SymInt H_, c10::SymInt W_, bool mean) {
  const char* op = "kdops::box_paint_fwd";
  const int64_t N = N_.guard_int(__FILE__, __LINE__), H = H_.guard_int(__FILE__, __LINE__),
                W = W_.guard_int(__FILE__, __LINE__);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == ranges.size(0), op, ": values must be (K,C)");
  const int64_t C = values.size(1);
  const auto boxes = boxes_per_image(ranges, batch_index, N, H, W, op);
  if (N * C * H * W == 0 || values.numel() == 0) return at::zeros({N, C, H, W}, values.options());
  auto out = at::empty({N, C, H, W}, values.options());  // every plane is written below
  const auto v = values.contiguous();
  const int64_t W1 = W + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "box_paint_fwd", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> D((H + 1) * W1), col(W);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / C, c = t % C;
        scalar_t* dst = op_ + t * H * W;
        if (boxes[n].empty()) {
          std::fill(dst, dst + H * W, scalar_t(0));
          continue;
        }
        std::fill(D.begin(), D.end(), 0.0);
        for (const Box& b : boxes[n]) {
          double val = double(vp[b.k * C + c]);
          if (mean) val /= box_count(b);
          D[b.y0 * W1 + b.x0] += val;
          D[b.y0 * W1 + b.x1 + 1] -= val;
          D[(b.y1 + 1) * W1 + b.x0] -= val;
          D[(b.y1 + 1) * W1 + b.x1 + 1] += val;
        }
        row_scan(D.data(), H, W, W1);
        std::fill(col.begin(), col.end(), 0.0);
        for (int64_t y = 0; y < H; ++y) col_emit(D.data() + y * W1, col.data(), dst + y * W, W);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("box_pool_fwd", &box_pool_fwd_cpu);
  m.impl("box_paint_fwd", &box_paint_fwd_cpu);
}

}  // namespace kdops
