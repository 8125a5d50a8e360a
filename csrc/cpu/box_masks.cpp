// CPU kernel of kdops::box_masks_fwd (the foreground mask of kdops.box_masks).
//
//   out[n,y,x] = max(0, max of weight[k] over the boxes k of image n whose inclusive range
//                [x0,x1]x[y0,y1] covers (y,x)).
//
// Painter's algorithm backwards: each image's boxes are visited by weight, largest first
// (ties by box index, a stable sort), and a box paints only the pixels no box has painted
// yet. The first paint of a pixel is therefore its maximum: the result is exact and does
// not depend on the visiting order of equal weights, nor on the thread count. Painted runs
// are skipped with one "next unpainted column" union-find per row (parent[x] = x while x is
// unpainted, else a column further right with every column in between painted; find() with
// path halving). A box row finds its first unpainted column, fills the unpainted run there
// (std::fill of the values and of the parents, which all point past the run), and jumps on:
// O(H*W + sum of box heights * alpha) per image, never proportional to box areas beyond the
// H*W pixels each painted once.
//
// Work is split into (image, block of rows) tasks: a task zero-fills its rows and paints the
// part of every box of its image that falls in them. Each output element has one owner, so
// results are bitwise reproducible for any thread count. Boxes with weight <= 0 (or NaN),
// empty ranges or a batch index outside [0,N) are skipped; ranges are clipped to the map, so
// nothing is read or written out of bounds. Weights are compared in float64 and written in
// the output dtype (a monotone cast, so the max of the casts is the cast of the max).
// Not differentiable (no autograd is registered: masks are built from integer box ranges).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct PaintBox {
  int64_t x0, y0, x1, y1;  // clipped, inclusive
  double w;
};

// Next unpainted column >= x in one row (parent has W+1 entries; W is the sentinel).
inline int32_t find_unpainted(int32_t* parent, int32_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];  // path halving
    x = parent[x];
  }
  return x;
}

at::Tensor box_masks_fwd_cpu(const at::Tensor& ranges, const at::Tensor& weight, const at::Tensor& batch_index,
                             c10::SymInt N_, c10::SymInt H_, c10::SymInt W_, at::ScalarType dtype) {
  const char* op = "kdops::box_masks_fwd";
  const int64_t N = N_.guard_int(__FILE__, __LINE__), H = H_.guard_int(__FILE__, __LINE__),
                W = W_.guard_int(__FILE__, __LINE__);
  TORCH_CHECK(N >= 0 && H >= 0 && W >= 0, op, ": N, H, W must be non-negative, got ", N, ", ", H, ", ", W);
  TORCH_CHECK(W < std::numeric_limits<int32_t>::max(), op, ": W must be < 2^31 - 1, got ", W);
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 4 && ranges.scalar_type() == at::kLong, op,
              ": ranges must be (K,4) int64, got ", ranges.sizes(), " ", ranges.scalar_type());
  const int64_t K = ranges.size(0);
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == K && batch_index.scalar_type() == at::kLong, op,
              ": batch_index must be (K,) int64 with K = ", K, ", got ", batch_index.sizes(), " ",
              batch_index.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == K && at::isFloatingType(weight.scalar_type()), op,
              ": weight must be (K,) floating with K = ", K, ", got ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  auto out = at::empty({N, H, W}, ranges.options().dtype(dtype));  // every element is written below
  if (out.numel() == 0) return out;

  // Valid boxes per image, clipped, sorted by weight descending (stable: ties by box index).
  const auto r = ranges.contiguous();
  const auto bidx = batch_index.contiguous();
  const auto wt = weight.to(at::kDouble).contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* bp = bidx.data_ptr<int64_t>();
  const double* wp = wt.data_ptr<double>();
  std::vector<std::vector<PaintBox>> per_image(N);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = bp[k];
    const double w = wp[k];
    const int64_t x0 = std::max<int64_t>(rp[4 * k], 0), y0 = std::max<int64_t>(rp[4 * k + 1], 0);
    const int64_t x1 = std::min<int64_t>(rp[4 * k + 2], W - 1), y1 = std::min<int64_t>(rp[4 * k + 3], H - 1);
    if (n < 0 || n >= N || x0 > x1 || y0 > y1 || !(w > 0.0)) continue;
    per_image[n].push_back({x0, y0, x1, y1, w});
  }
  for (auto& boxes : per_image)
    std::stable_sort(boxes.begin(), boxes.end(), [](const PaintBox& a, const PaintBox& b) { return a.w > b.w; });

  // Row blocks of >= ~16K pixels; chunks of < ~32K pixels run on the calling thread: an FPN
  // level paints in tens of microseconds, less than waking a second thread costs (on a loaded
  // 2-core machine, far less), so typical levels stay serial and only big maps are split.
  const int64_t rows_per_block = std::min<int64_t>(H, std::max<int64_t>(1, 16384 / W));
  const int64_t blocks = (H + rows_per_block - 1) / rows_per_block;
  const int64_t grain = std::max<int64_t>(1, 32768 / (rows_per_block * W));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "box_masks_fwd", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> parent(rows_per_block * (W + 1));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks;
        const int64_t r0 = (t % blocks) * rows_per_block, r1 = std::min(H, r0 + rows_per_block);  // rows [r0, r1)
        scalar_t* plane = op_ + n * H * W;
        std::fill(plane + r0 * W, plane + r1 * W, scalar_t(0));
        const auto& boxes = per_image[n];
        if (boxes.empty()) continue;
        for (int64_t y = r0; y < r1; ++y) {
          int32_t* p = parent.data() + (y - r0) * (W + 1);
          for (int32_t x = 0; x <= static_cast<int32_t>(W); ++x) p[x] = x;
        }
        for (const PaintBox& b : boxes) {
          const int64_t ya = std::max(b.y0, r0), yb = std::min(b.y1, r1 - 1);
          if (ya > yb) continue;
          const scalar_t v = static_cast<scalar_t>(b.w);
          const int32_t x0 = static_cast<int32_t>(b.x0), x1 = static_cast<int32_t>(b.x1);
          for (int64_t y = ya; y <= yb; ++y) {
            int32_t* p = parent.data() + (y - r0) * (W + 1);
            scalar_t* row = plane + y * W;
            int32_t x = find_unpainted(p, x0);
            while (x <= x1) {  // paint the unpainted run [x, e), then jump past painted columns
              int32_t e = x + 1;
              while (e <= x1 && p[e] == e) ++e;
              std::fill(row + x, row + e, v);
              std::fill(p + x, p + e, e);
              x = find_unpainted(p, e);
            }
            p[x0] = x;  // every column of [x0, x) is painted now
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("box_masks_fwd", &box_masks_fwd_cpu); }

}  // namespace kdops
