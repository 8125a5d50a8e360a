// CPU kernels of kdops::box_pool_fwd and its adjoint kdops::box_paint_fwd.
//
// One task per block of 8 channels of an image (box_pool_kernel.h sweeps them as vector
// lanes); each plane is read (pool) or written (paint) exactly once, row by row, with
// O(W) float64 scratch per channel that stays in L1. For image n the boxes become
// "events": box k (clipped inclusive range [x0,x1]x[y0,y1]) enters at row y0 and leaves
// at row y1+1.
// - pool: V[x] = sum of the rows read so far (column sums, float64). At an event row r,
//   the sum of V over [x0, x1] is the box's sum over rows < r, so
//       pool[k] = sum_{x0..x1} V_{y1+1} - sum_{x0..x1} V_{y0}.
//   The column sums over [x0,x1] come from segment sums between the row's sorted, unique
//   box edges: O(W) per event row, whatever the number or width of the boxes there.
//   Rows above the first event row and columns left of the leftmost box cancel in the
//   difference, so only the bounding rectangle of the image's boxes is read.
// - paint: R[x] = sum of the values of the boxes covering (row, x); at an event row the
//   entering/leaving boxes add/subtract their value on [x0,x1] (a 1-D difference array
//   over the same segments), then every row is written from R. Rows and columns outside
//   every box are written as exact zeros.
// Cost O(H*W) per plane plus O(W + boxes) per event row: never proportional to box areas.
// Each block has one owner and a fixed summation order, so results are bitwise
// reproducible for any thread count. Ranges are clipped to the map, and boxes with an
// out-of-range batch index are skipped: no input is read or written out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct Event {
  int64_t box;    // index into ImagePlan::boxes
  int64_t a, b;   // indices of x0 and x1+1 in the row's edge list
  double sign;    // -1 where the box enters (row y0), +1 where it leaves (row y1+1)
};

struct EventRow {
  int64_t row;
  int64_t ev_begin, ev_end;    // into ImagePlan::events
  int64_t edge_begin, edge_end;  // into ImagePlan::edges (sorted, unique, relative to x_lo)
};

struct ImagePlan {
  std::vector<int64_t> boxes;   // global box index
  std::vector<double> scale;    // 1 / pixel count for mean, else 1
  std::vector<EventRow> rows;   // increasing row
  std::vector<Event> events;
  std::vector<int64_t> edges;
  int64_t x_lo = 0, x_hi = 0;   // columns [x_lo, x_hi) hold every box of the image
};

// Event plans per image, from the (K,4) inclusive ranges; boxes that are empty after
// clipping to the HxW map, or whose image is out of range, are left out. Events are put in
// row order with a counting sort (stable: box order within a row). O(K + N*H) plus the
// sorting of each row's few edges.
std::vector<ImagePlan> plan_images(const at::Tensor& ranges, const at::Tensor& batch_index, int64_t N, int64_t H,
                                   int64_t W, bool mean, const char* op) {
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 4 && ranges.scalar_type() == at::kLong, op,
              ": ranges must be (K,4) int64");
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == ranges.size(0) &&
                  batch_index.scalar_type() == at::kLong,
              op, ": batch_index must be (K,) int64");
  const auto r = ranges.contiguous();
  const auto bidx = batch_index.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* bp = bidx.data_ptr<int64_t>();
  struct Box {
    int64_t k, x0, y0, x1, y1;  // clipped; x1, y1 exclusive
  };
  std::vector<std::vector<Box>> per_image(N);
  for (int64_t k = 0; k < r.size(0); ++k) {
    const int64_t n = bp[k];
    const int64_t x0 = std::max<int64_t>(rp[4 * k], 0), y0 = std::max<int64_t>(rp[4 * k + 1], 0);
    const int64_t x1 = std::min<int64_t>(rp[4 * k + 2], W - 1), y1 = std::min<int64_t>(rp[4 * k + 3], H - 1);
    if (n < 0 || n >= N || x0 > x1 || y0 > y1) continue;
    per_image[n].push_back({k, x0, y0, x1 + 1, y1 + 1});
  }
  std::vector<ImagePlan> plans(N);
  // one thread: an image's plan is O(boxes + H) work, far less than waking a thread team
  const auto plan_range = [&](int64_t begin, int64_t end) {
    std::vector<int64_t> count, order;
    for (int64_t n = begin; n < end; ++n) {
      const auto& bx = per_image[n];
      ImagePlan& p = plans[n];
      const int64_t nb = static_cast<int64_t>(bx.size());
      if (nb == 0) continue;
      p.boxes.resize(nb);
      p.scale.resize(nb);
      p.x_lo = W;
      p.x_hi = 0;
      count.assign(H + 2, 0);
      for (int64_t j = 0; j < nb; ++j) {
        const Box& b = bx[j];
        p.boxes[j] = b.k;
        p.scale[j] = mean ? 1.0 / double((b.x1 - b.x0) * (b.y1 - b.y0)) : 1.0;
        p.x_lo = std::min(p.x_lo, b.x0);
        p.x_hi = std::max(p.x_hi, b.x1);
        ++count[b.y0 + 1];
        ++count[b.y1 + 1];
      }
      for (int64_t y = 0; y <= H; ++y) count[y + 1] += count[y];  // count[y] = first slot of row y
      order.resize(2 * nb);  // event e = 2 j (+1 for the leaving one), in row order
      for (int64_t j = 0; j < nb; ++j) {
        order[count[bx[j].y0]++] = 2 * j;
        order[count[bx[j].y1]++] = 2 * j + 1;
      }
      p.events.reserve(2 * nb);
      p.edges.reserve(4 * nb);
      for (int64_t i = 0; i < 2 * nb;) {
        const auto row_of = [&](int64_t e) { return e & 1 ? bx[e >> 1].y1 : bx[e >> 1].y0; };
        const int64_t row = row_of(order[i]);
        int64_t end_i = i;
        while (end_i < 2 * nb && row_of(order[end_i]) == row) ++end_i;
        EventRow er{row, int64_t(p.events.size()), 0, int64_t(p.edges.size()), 0};
        for (int64_t t = i; t < end_i; ++t) {
          const Box& b = bx[order[t] >> 1];
          p.edges.push_back(b.x0 - p.x_lo);
          p.edges.push_back(b.x1 - p.x_lo);
        }
        const auto first = p.edges.begin() + er.edge_begin;
        std::sort(first, p.edges.end());
        p.edges.erase(std::unique(first, p.edges.end()), p.edges.end());
        er.edge_end = int64_t(p.edges.size());
        const int64_t* lo = p.edges.data() + er.edge_begin;
        const int64_t* hi = p.edges.data() + er.edge_end;
        for (int64_t t = i; t < end_i; ++t) {
          const int64_t e = order[t];
          const Box& b = bx[e >> 1];
          p.events.push_back({e >> 1, std::lower_bound(lo, hi, b.x0 - p.x_lo) - lo,
                              std::lower_bound(lo, hi, b.x1 - p.x_lo) - lo, e & 1 ? 1.0 : -1.0});
        }
        er.ev_end = int64_t(p.events.size());
        p.rows.push_back(er);
        i = end_i;
      }
    }
  };
  plan_range(0, N);
  return plans;
}

constexpr int kBoxLanes = 8;  // channels swept together (lane-interleaved scratch)

// Blocks per task so that a task holds at least ~64K feature elements: small levels (P6, P7)
// then run on the calling thread instead of paying a thread team's wake-up and barrier.
inline int64_t block_grain(int64_t H, int64_t W) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, H * W * kBoxLanes));
}

}  // namespace
}  // namespace kdops

#define KDOPS_KERNEL "box_pool_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

// Base pointers of a block's channels (lanes past C repeat the block's first channel).
template <typename T>
inline void block_lanes(T* base, int64_t stride_c, int64_t c0, int64_t C, T** lanes) {
  for (int c = 0; c < kBoxLanes; ++c) lanes[c] = base + (c0 + c < C ? c0 + c : c0) * stride_c;
}

at::Tensor box_pool_fwd_cpu(const at::Tensor& feature, const at::Tensor& ranges, const at::Tensor& batch_index,
                            bool mean) {
  const char* op = "kdops::box_pool_fwd";
  TORCH_CHECK(feature.dim() == 4, op, ": feature must be (N,C,H,W)");
  const int64_t N = feature.size(0), C = feature.size(1), H = feature.size(2), W = feature.size(3);
  const auto plans = plan_images(ranges, batch_index, N, H, W, mean, op);
  auto out = at::zeros({ranges.size(0), C}, feature.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;
  const int64_t blocks = (C + kBoxLanes - 1) / kBoxLanes;
  const bool avx2 = cpu_has_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "box_pool_fwd", [&] {
    const scalar_t* fp = feature.data_ptr<scalar_t>();
    const int64_t sN = feature.stride(0), sC = feature.stride(1), sH = feature.stride(2), sW = feature.stride(3);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * blocks, block_grain(H, W), [&](int64_t begin, int64_t end) {
      std::vector<double> V(W * kBoxLanes), Q((W + 2) * kBoxLanes), acc;
      const scalar_t* lanes[kBoxLanes];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kBoxLanes;
        const ImagePlan& p = plans[n];
        if (p.rows.empty()) continue;
        acc.resize(p.boxes.size() * kBoxLanes);
        block_lanes(fp + n * sN + p.x_lo * sW, sC, c0, C, lanes);
        if (avx2) {
          avx2::box_pool_block(p, lanes, sH, sW, V.data(), Q.data(), acc.data());
        } else {
          base::box_pool_block(p, lanes, sH, sW, V.data(), Q.data(), acc.data());
        }
        const int cb = static_cast<int>(std::min<int64_t>(kBoxLanes, C - c0));
        for (size_t j = 0; j < p.boxes.size(); ++j)
          for (int c = 0; c < cb; ++c)
            op_[p.boxes[j] * C + c0 + c] = static_cast<scalar_t>(acc[j * kBoxLanes + c] * p.scale[j]);
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
  const auto plans = plan_images(ranges, batch_index, N, H, W, mean, op);
  if (N * C * H * W == 0 || values.numel() == 0) return at::zeros({N, C, H, W}, values.options());
  auto out = at::empty({N, C, H, W}, values.options());  // every element is written below
  const auto v = values.contiguous();
  const int64_t blocks = (C + kBoxLanes - 1) / kBoxLanes;
  const bool avx2 = cpu_has_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "box_paint_fwd", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * blocks, block_grain(H, W), [&](int64_t begin, int64_t end) {
      std::vector<double> R(W * kBoxLanes), d((W + 2) * kBoxLanes);
      scalar_t* lanes[kBoxLanes];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kBoxLanes;
        const int cb = static_cast<int>(std::min<int64_t>(kBoxLanes, C - c0));
        block_lanes(op_ + n * C * H * W, H * W, c0, C, lanes);
        if (avx2) {
          avx2::box_paint_block(plans[n], vp, C, c0, cb, lanes, H, W, R.data(), d.data());
        } else {
          base::box_paint_block(plans[n], vp, C, c0, cb, lanes, H, W, R.data(), d.data());
        }
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
