// CPU kernels of kdops::box_pool_fwd and its adjoint kdops::box_paint_fwd, all FPN levels per call.
//
// One task per (level, image, block of 16 (pool) or 8 (paint) channels), all levels' tasks in
// one TaskPool (no barrier per level; box_pool_kernel.h sweeps 8 channels at a time as vector
// lanes). Each plane is read (pool) or written (paint) exactly once, row by row, with O(W)
// float64 scratch per channel that stays in L1. For image n the boxes become "events": box k (clipped inclusive range
// [x0,x1]x[y0,y1]) enters at row y0 and leaves at row y1+1.
// - pool: V[x] = sum of the rows read so far (column sums, float64). At an event row r,
//   the sum of V over [x0, x1] is the box's sum over rows < r, so
//       pool[k] = sum_{x0..x1} V_{y1+1} - sum_{x0..x1} V_{y0}.
//   The column sums over [x0,x1] come from prefix sums of V at the row's sorted, unique box
//   edges: O(W) per event row, whatever the number or width of the boxes there.
//   A pixel that no box active at its row covers would add the same amount to both ends of
//   every box's difference (or to neither), so only the pixels inside the union of the boxes
//   are read: per row, the merged column spans of the boxes active there.
// - paint: R[x] = sum of the values of the boxes covering (row, x); at an event row the
//   entering/leaving boxes add/subtract their value on [x0,x1] (a 1-D difference array
//   over the same edges), then every row is written from R. Rows and columns outside
//   every box are written as exact zeros.
// Cost O(H*W) per plane (pool: the boxes' union) plus O(W + boxes) per event row: never
// proportional to the sum of the box areas.
// Each block has one owner and a fixed summation order, so results are bitwise
// reproducible for any thread count. Ranges are clipped to the map, and boxes with an
// out-of-range batch index are skipped: no input is read or written out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
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
  int64_t span_begin, span_end;  // into ImagePlan::spans: the columns the boxes active below cover
};

struct ImagePlan {
  std::vector<int64_t> boxes;   // global box index
  std::vector<double> scale;    // 1 / pixel count for mean, else 1
  std::vector<EventRow> rows;   // increasing row
  std::vector<Event> events;
  std::vector<int64_t> edges;
  // [a, b) column intervals (relative to x_lo), sorted and disjoint: the union of the boxes active
  // from an event row to the next one. Pooling reads only these pixels: a pixel no active box
  // covers adds the same amount to both ends of every box's difference (or to neither).
  std::vector<std::pair<int64_t, int64_t>> spans;
  int64_t x_lo = 0, x_hi = 0;   // columns [x_lo, x_hi) hold every box of the image
};

struct Box {
  int64_t k, x0, y0, x1, y1;  // clipped to the map; x1, y1 exclusive
};

// The boxes of each image on one level, from its (K,4) inclusive ranges `rp`, clipped to the
// HxW map; boxes that are empty after clipping, or whose image is out of range, are left out
// and listed in `skipped` (their outputs are zero).
std::vector<std::vector<Box>> collect_boxes(const int64_t* rp, const int64_t* bp, int64_t K, int64_t N, int64_t H,
                                            int64_t W, std::vector<int64_t>& skipped) {
  std::vector<std::vector<Box>> per_image(N);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = bp[k];
    const int64_t x0 = std::max<int64_t>(rp[4 * k], 0), y0 = std::max<int64_t>(rp[4 * k + 1], 0);
    const int64_t x1 = std::min<int64_t>(rp[4 * k + 2], W - 1), y1 = std::min<int64_t>(rp[4 * k + 3], H - 1);
    if (n < 0 || n >= N || x0 > x1 || y0 > y1) {
      skipped.push_back(k);
      continue;
    }
    per_image[n].push_back({k, x0, y0, x1 + 1, y1 + 1});
  }
  return per_image;
}

struct PlanScratch {
  std::vector<int64_t> count, order, slot, cover;
  std::vector<uint8_t> mark;
};

// The event plan of one image. Events are put in row order with a counting sort (stable: box
// order within a row). Each event row then takes one scan over the image's columns, which
// yields the row's sorted unique edges (and each event's edge indices) and the union of the
// boxes active below it (a coverage difference array updated by the row's events): O(boxes +
// H) plus O(width) per event row, which is below the sweep's own O(width) per row per block.
void plan_image(const std::vector<Box>& bx, int64_t H, int64_t W, bool mean, PlanScratch& sc, ImagePlan& p) {
  auto& [count, order, slot, cover, mark] = sc;
  const int64_t nb = static_cast<int64_t>(bx.size());
  if (nb == 0) return;
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
  const int64_t width = p.x_hi - p.x_lo;
  slot.resize(width + 1);
  cover.assign(width + 1, 0);  // cover[x] - cover[x-1]: change in the number of active boxes at x
  mark.assign(width + 1, 0);
  p.events.reserve(2 * nb);
  p.edges.reserve(4 * nb);
  for (int64_t i = 0; i < 2 * nb;) {
    const auto row_of = [&](int64_t e) { return e & 1 ? bx[e >> 1].y1 : bx[e >> 1].y0; };
    const int64_t row = row_of(order[i]);
    int64_t end_i = i;
    while (end_i < 2 * nb && row_of(order[end_i]) == row) ++end_i;
    EventRow er{row, int64_t(p.events.size()), 0, int64_t(p.edges.size()), 0, int64_t(p.spans.size()), 0};
    for (int64_t t = i; t < end_i; ++t) {
      const Box& b = bx[order[t] >> 1];
      const int64_t d = order[t] & 1 ? -1 : 1;  // entering / leaving
      mark[b.x0 - p.x_lo] = mark[b.x1 - p.x_lo] = 1;
      cover[b.x0 - p.x_lo] += d;
      cover[b.x1 - p.x_lo] -= d;
    }
    int64_t active = 0, start = 0;
    for (int64_t x = 0; x <= width; ++x) {
      if (mark[x]) {
        mark[x] = 0;
        slot[x] = int64_t(p.edges.size()) - er.edge_begin;
        p.edges.push_back(x);
      }
      const int64_t now = active + cover[x];
      if ((now > 0) != (active > 0)) {
        if (now > 0) {
          start = x;
        } else {
          p.spans.emplace_back(start, x);
        }
      }
      active = now;
    }
    er.edge_end = int64_t(p.edges.size());
    er.span_end = int64_t(p.spans.size());
    for (int64_t t = i; t < end_i; ++t) {
      const int64_t e = order[t];
      const Box& b = bx[e >> 1];
      p.events.push_back({e >> 1, slot[b.x0 - p.x_lo], slot[b.x1 - p.x_lo], e & 1 ? 1.0 : -1.0});
    }
    er.ev_end = int64_t(p.events.size());
    p.rows.push_back(er);
    i = end_i;
  }
}

constexpr int kBoxLanes = 8;  // channels swept together (lane-interleaved scratch)
// Channels per pooling task: two sweeps, so that a task writes whole 64-byte lines of each box's
// output row. With 8, neighbouring blocks (run at the same time by two threads) wrote halves of
// the same lines, which then bounced between the cores: 9% of the K=1000 time at 2 threads.
constexpr int64_t kTaskChannels = 2 * kBoxLanes;

}  // namespace
}  // namespace kdops

#define KDOPS_KERNEL "box_pool_kernel.h"
#define KDOPS_KERNEL_MAX_AVX2  // 4-lane double sweeps: AVX-512 measured no faster here
#include "multi_isa.h"

namespace kdops {
namespace {

// Base pointers of a block's channels (lanes past C repeat the block's first channel).
template <typename T>
inline void block_lanes(T* base, int64_t stride_c, int64_t c0, int64_t C, T** lanes) {
  for (int c = 0; c < kBoxLanes; ++c) lanes[c] = base + (c0 + c < C ? c0 + c : c0) * stride_c;
}

// Every level's plans from ranges (L,K,4) and batch_index (K,): O(K + N*H) per level plus the
// sorting of each event row's edges and spans, on the calling thread for a few boxes and one
// task per (level, image) in a task pool for many.
struct LevelPlans {
  std::vector<std::vector<ImagePlan>> plans;    // [level][image]
  std::vector<std::vector<int64_t>> skipped;    // [level]: boxes that cover nothing there
};

LevelPlans plan_levels(const at::Tensor& ranges, const at::Tensor& batch_index, int64_t L, int64_t N,
                       const std::vector<int64_t>& H, const std::vector<int64_t>& W, bool mean, const char* op) {
  TORCH_CHECK(ranges.dim() == 3 && ranges.size(0) == L && ranges.size(2) == 4 && ranges.scalar_type() == at::kLong,
              op, ": ranges must be (L,K,4) int64 with L = ", L);
  const int64_t K = ranges.size(1);
  TORCH_CHECK(batch_index.dim() == 1 && batch_index.size(0) == K && batch_index.scalar_type() == at::kLong, op,
              ": batch_index must be (K,) int64");
  const auto r = ranges.contiguous();
  const auto bi = batch_index.contiguous();
  LevelPlans lp;
  lp.plans.assign(L, std::vector<ImagePlan>(N));
  lp.skipped.resize(L);
  std::vector<std::vector<std::vector<Box>>> boxes(L);
  for (int64_t l = 0; l < L; ++l)
    boxes[l] = collect_boxes(r.data_ptr<int64_t>() + l * K * 4, bi.data_ptr<int64_t>(), K, N, H[l], W[l],
                             lp.skipped[l]);
  const auto plan = [&](PlanScratch& sc, int64_t t) {
    const int64_t l = t / N, n = t % N;
    plan_image(boxes[l][n], H[l], W[l], mean, sc, lp.plans[l][n]);
  };
  if (K * L < 4096) {  // a few boxes: less work than waking a helper thread
    PlanScratch sc;
    for (int64_t t = 0; t < L * N; ++t) plan(sc, t);
  } else {
    TaskPool(L * N).run([] { return PlanScratch{}; }, plan);
  }
  return lp;
}

// One task per (level, image, block of `step` channels) with boxes, largest levels first,
// all levels in one pool (no barrier per level, and small levels' event work is shared too).
struct BlockTask {
  int64_t level, image, c0;
};

std::vector<BlockTask> block_tasks(const LevelPlans& lp, int64_t C, int64_t step, bool all_images) {
  std::vector<BlockTask> tasks;
  for (int64_t l = 0; l < int64_t(lp.plans.size()); ++l)
    for (int64_t n = 0; n < int64_t(lp.plans[l].size()); ++n)
      if (all_images || !lp.plans[l][n].rows.empty())
        for (int64_t c0 = 0; c0 < C; c0 += step) tasks.push_back({l, n, c0});
  return tasks;
}

at::Tensor box_pool_fwd_cpu(at::TensorList features, const at::Tensor& ranges, const at::Tensor& batch_index,
                            bool mean) {
  const char* op = "kdops::box_pool_fwd";
  const int64_t L = features.size();
  TORCH_CHECK(L > 0, op, ": features must hold at least one level");
  const auto& f0 = features[0];
  TORCH_CHECK(f0.dim() == 4, op, ": features must be (N,C,H,W)");
  const int64_t N = f0.size(0), C = f0.size(1);
  std::vector<int64_t> H, W;
  for (const auto& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(0) == N && f.size(1) == C && f.scalar_type() == f0.scalar_type() &&
                    f.device() == f0.device(),
                op, ": every level must be (N,C,H,W) with one N, C, dtype and device");
    H.push_back(f.size(2));
    W.push_back(f.size(3));
  }
  const auto lp = plan_levels(ranges, batch_index, L, N, H, W, mean, op);
  const int64_t K = ranges.size(1);
  auto out = at::empty({L, K, C}, f0.options());
  if (out.numel() == 0) return out;
  const auto tasks = block_tasks(lp, C, kTaskChannels, false);
  const int64_t w_max = *std::max_element(W.begin(), W.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "box_pool_fwd", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    for (int64_t l = 0; l < L; ++l)  // boxes that cover nothing on a level pool to 0 there
      for (int64_t k : lp.skipped[l]) std::fill(op_ + (l * K + k) * C, op_ + (l * K + k + 1) * C, scalar_t(0));
    struct Scratch {
      std::vector<double> V, Q, P, acc;
    };
    TaskPool(int64_t(tasks.size())).run(
        [&] {
          return Scratch{std::vector<double>(w_max * kBoxLanes), std::vector<double>((w_max + 2) * kBoxLanes),
                         std::vector<double>((w_max + 1) * kBoxLanes), {}};
        },
        [&](Scratch& s, int64_t t) {
          const BlockTask& bt = tasks[t];
          const at::Tensor& f = features[bt.level];
          const ImagePlan& p = lp.plans[bt.level][bt.image];
          const int64_t nb = int64_t(p.boxes.size());
          const scalar_t* fp = f.data_ptr<scalar_t>();
          const int64_t sH = f.stride(2), sW = f.stride(3);
          const int64_t cb = std::min<int64_t>(kTaskChannels, C - bt.c0);
          s.acc.resize(nb * kTaskChannels);
          for (int64_t c = 0; c < cb; c += kBoxLanes) {  // acc: the sweeps' (boxes x lanes) blocks in turn
            const scalar_t* lanes[kBoxLanes];
            block_lanes(fp + bt.image * f.stride(0) + p.x_lo * sW, f.stride(1), bt.c0 + c, C, lanes);
            double* acc = s.acc.data() + (c / kBoxLanes) * nb * kBoxLanes;
            KDOPS_ISA_PICK(box_pool_block<scalar_t>)(p, lanes, sH, sW, s.V.data(), s.Q.data(), s.P.data(), acc);
          }
          // a box's channels of this task fill whole cache lines of the (L,K,C) output
          scalar_t* o = op_ + bt.level * K * C + bt.c0;
          const double* acc = s.acc.data();
          for (int64_t j = 0; j < nb; ++j) {
            scalar_t* oj = o + p.boxes[j] * C;
            const double sc = p.scale[j];
            for (int64_t c = 0; c < cb; c += kBoxLanes) {
              const double* a = acc + (c / kBoxLanes) * nb * kBoxLanes + j * kBoxLanes;
              if (cb - c >= kBoxLanes) {  // fixed trip count: one vector
                for (int l = 0; l < kBoxLanes; ++l) oj[c + l] = static_cast<scalar_t>(a[l] * sc);
              } else {
                for (int64_t l = 0; l < cb - c; ++l) oj[c + l] = static_cast<scalar_t>(a[l] * sc);
              }
            }
          }
        });
  });
  return out;
}

std::vector<at::Tensor> box_paint_fwd_cpu(const at::Tensor& values, const at::Tensor& ranges,
                                          const at::Tensor& batch_index, c10::SymIntArrayRef sizes_, bool mean) {
  const char* op = "kdops::box_paint_fwd";
  const auto sizes = C10_AS_INTARRAYREF_SLOW(sizes_);
  TORCH_CHECK(!sizes.empty() && sizes.size() % 3 == 0, op, ": sizes must hold (N,H,W) per level");
  const int64_t L = sizes.size() / 3;
  TORCH_CHECK(values.dim() == 3 && values.size(0) == L && values.size(1) == ranges.size(1), op,
              ": values must be (L,K,C)");
  const int64_t N = sizes[0], C = values.size(2);
  std::vector<int64_t> H, W;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(sizes[3 * l] == N, op, ": every level must have the same N");
    H.push_back(sizes[3 * l + 1]);
    W.push_back(sizes[3 * l + 2]);
  }
  const auto lp = plan_levels(ranges, batch_index, L, N, H, W, mean, op);
  std::vector<at::Tensor> outs;
  for (int64_t l = 0; l < L; ++l) outs.push_back(at::empty({N, C, H[l], W[l]}, values.options()));
  // every element of every plane is written by its block's task (zeros outside the boxes)
  const auto v = values.stride(2) == 1 ? values : values.contiguous();
  const auto tasks = block_tasks(lp, C, kBoxLanes, true);
  const int64_t w_max = *std::max_element(W.begin(), W.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "box_paint_fwd", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    struct Scratch {
      std::vector<double> R, d;
    };
    TaskPool(int64_t(tasks.size())).run(
        [&] { return Scratch{std::vector<double>(w_max * kBoxLanes), std::vector<double>((w_max + 2) * kBoxLanes)}; },
        [&](Scratch& s, int64_t t) {
          const BlockTask& bt = tasks[t];
          const int64_t l = bt.level, Hl = H[l], Wl = W[l];
          if (Hl * Wl == 0) return;
          const int cb = static_cast<int>(std::min<int64_t>(kBoxLanes, C - bt.c0));
          scalar_t* lanes[kBoxLanes];
          block_lanes(outs[l].data_ptr<scalar_t>() + bt.image * C * Hl * Wl, Hl * Wl, bt.c0, C, lanes);
          const scalar_t* vl = vp + l * v.stride(0) + bt.c0;
          KDOPS_ISA_PICK(box_paint_block<scalar_t>)(lp.plans[l][bt.image], vl, v.stride(1), cb, lanes, Hl, Wl,
                                                    s.R.data(), s.d.data());
        });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("box_pool_fwd", &box_pool_fwd_cpu);
  m.impl("box_paint_fwd", &box_paint_fwd_cpu);
}

}  // namespace kdops
