// Per-block kernels of box_pool / box_paint (see box_pool.cpp for the method). box_pool.cpp
// includes this file through multi_isa.h, once per instruction set (no include guard on purpose).
//
// A block is kBoxLanes channels of one image, swept together row by row. The running rows
// (V for pool, R for paint) keep one row per channel, V[c * ld + x], so the per-row work --
// widening a feature row into V, writing a painted row from R -- is a contiguous vector
// loop. At event rows the work is done for all 8 channels at once, so per-row bookkeeping
// (edges, events) is paid once per block: each segment between the row's box edges is summed
// (pool) or updated (paint) 4 columns at a time in 8 independent vector chains; pooled rows with
// many short segments (many boxes) instead carry one running sum along the row in 4x4
// transposed tiles, with no branch per segment. Lanes past the last channel read the block's
// first channel (valid memory) and their results are dropped.

namespace kdops {
namespace KDOPS_ISA {

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4di __attribute__((vector_size(32)));

KDOPS_INLINE v4d box_load(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

KDOPS_INLINE void box_store(double* p, v4d v) { std::memcpy(p, &v, sizeof(v)); }

// V[c] += feature row (columns [0, width) from each lane's base + offset).
template <typename scalar_t>
KDOPS_INLINE void box_add_row(const scalar_t* const* lanes, int64_t offset, int64_t sH, int64_t sW, double* V,
                              int64_t ld, int64_t width) {
  for (int c = 0; c < kBoxLanes; ++c) {
    const scalar_t* src = lanes[c] + offset;
    double* v = V + c * ld;
    if (sW == 1) {
      // the next row of this lane: event rows pause the stream, and the hardware prefetcher
      // alone then runs too short a distance ahead of 8 interleaved streams
      // (address arithmetic on integers: the row below the last one lies outside the tensor, and
      // a prefetch never faults, but a pointer past the end may not even be formed)
      const uintptr_t next = reinterpret_cast<uintptr_t>(src + 0) + uintptr_t(sH) * sizeof(scalar_t);
      for (int64_t x = 0; x < width; x += 64 / sizeof(scalar_t))
        __builtin_prefetch(reinterpret_cast<const void*>(next + uintptr_t(x) * sizeof(scalar_t)));
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) v[x] += double(src[x]);
    } else if (sW == 0) {  // a row broadcast along x (e.g. the gradient of a sum, expanded)
      const double a = double(src[0]);
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) v[x] += a;
    } else {
      for (int64_t x = 0; x < width; ++x) v[x] += double(src[x * sW]);
    }
  }
}

// Q[i * lanes + c] = sum of V[c] over columns [e[0], e[i]), for the row's ne sorted edges.
// A segment of at least kVectorSegment columns is summed 4 columns at a time in 8
// independent vector accumulators (one per lane), then its remaining columns; a shorter
// one column by column in 8 scalar accumulators (no horizontal sums). The order depends
// only on the edges, so results are reproducible.
constexpr int64_t kVectorSegment = 8;

KDOPS_INLINE void box_edge_sums(const double* V, int64_t ld, const int64_t* e, int64_t ne, double* Q) {
  static_assert(kBoxLanes == 8, "written for 8 lanes");
  double run[kBoxLanes] = {};
  for (int c = 0; c < kBoxLanes; ++c) Q[c] = 0.0;
  for (int64_t i = 0; i + 1 < ne; ++i) {
    double* q = Q + (i + 1) * kBoxLanes;
    if (e[i + 1] - e[i] >= kVectorSegment) {
      v4d acc[kBoxLanes] = {};
      int64_t x = e[i];
      for (; x + 4 <= e[i + 1]; x += 4)
        for (int c = 0; c < kBoxLanes; ++c) acc[c] += box_load(V + c * ld + x);
      for (int c = 0; c < kBoxLanes; ++c) {
        double s = (acc[c][0] + acc[c][1]) + (acc[c][2] + acc[c][3]);
        for (int64_t t = x; t < e[i + 1]; ++t) s += V[c * ld + t];
        q[c] = run[c] += s;
      }
    } else {
      double r0 = run[0], r1 = run[1], r2 = run[2], r3 = run[3], r4 = run[4], r5 = run[5], r6 = run[6], r7 = run[7];
      const double* v = V + e[i];
      for (int64_t x = 0, n = e[i + 1] - e[i]; x < n; ++x) {
        r0 += v[x];
        r1 += v[ld + x];
        r2 += v[2 * ld + x];
        r3 += v[3 * ld + x];
        r4 += v[4 * ld + x];
        r5 += v[5 * ld + x];
        r6 += v[6 * ld + x];
        r7 += v[7 * ld + x];
      }
      q[0] = run[0] = r0, q[1] = run[1] = r1, q[2] = run[2] = r2, q[3] = run[3] = r3;
      q[4] = run[4] = r4, q[5] = run[5] = r5, q[6] = run[6] = r6, q[7] = run[7] = r7;
    }
  }
}

// out[j][i] = in[i][j] for a 4x4 block of doubles (lanes <-> columns).
KDOPS_INLINE void box_transpose4(const v4d* in, v4d* out) {
  const v4d t0 = __builtin_shuffle(in[0], in[1], (v4di){0, 4, 2, 6});
  const v4d t1 = __builtin_shuffle(in[0], in[1], (v4di){1, 5, 3, 7});
  const v4d t2 = __builtin_shuffle(in[2], in[3], (v4di){0, 4, 2, 6});
  const v4d t3 = __builtin_shuffle(in[2], in[3], (v4di){1, 5, 3, 7});
  out[0] = __builtin_shuffle(t0, t2, (v4di){0, 1, 4, 5});
  out[1] = __builtin_shuffle(t1, t3, (v4di){0, 1, 4, 5});
  out[2] = __builtin_shuffle(t0, t2, (v4di){2, 3, 6, 7});
  out[3] = __builtin_shuffle(t1, t3, (v4di){2, 3, 6, 7});
}

// Same result contract as box_edge_sums, for rows with many edges: short segments there make
// the per-segment loops mispredict at almost every edge. Instead the running sum of all 8
// lanes is carried along the whole span, 4 columns at a time transposed (lanes 0-3, 4-7) into
// two vector chains with no branch per column, its value after every column is stored
// column-major in P, and the edges' prefix sums are read from P.
KDOPS_INLINE void box_edge_sums_dense(const double* V, int64_t ld, const int64_t* e, int64_t ne, double* Q,
                                      double* P) {
  const int64_t x0 = e[0], x_end = e[ne - 1];
  v4d lo = {}, hi = {};
  box_store(P, lo);
  box_store(P + 4, hi);
  double* out = P + kBoxLanes;
  int64_t x = x0;
  for (; x + 4 <= x_end; x += 4, out += 4 * kBoxLanes) {
    v4d a[kBoxLanes];
    for (int c = 0; c < kBoxLanes; ++c) a[c] = box_load(V + c * ld + x);
    v4d col[2][4];  // col[h][j]: lanes 4h..4h+3 of column x + j
    box_transpose4(a, col[0]);
    box_transpose4(a + 4, col[1]);
    for (int j = 0; j < 4; ++j) {
      lo += col[0][j];
      hi += col[1][j];
      box_store(out + j * kBoxLanes, lo);
      box_store(out + j * kBoxLanes + 4, hi);
    }
  }
  for (; x < x_end; ++x, out += kBoxLanes) {
    for (int c = 0; c < 4; ++c) lo[c] += V[c * ld + x];
    for (int c = 0; c < 4; ++c) hi[c] += V[(c + 4) * ld + x];
    box_store(out, lo);
    box_store(out + 4, hi);
  }
  for (int64_t i = 0; i < ne; ++i) {
    const double* pi = P + (e[i] - x0) * kBoxLanes;
    box_store(Q + i * kBoxLanes, box_load(pi));
    box_store(Q + i * kBoxLanes + 4, box_load(pi + 4));
  }
}

// Pooled rows whose segments average fewer columns than this take box_edge_sums_dense.
constexpr int64_t kDenseSegment = 16;

// Pools one block: acc (boxes x lanes) receives every box's sum over its pixels.
template <typename scalar_t>
void box_pool_block(const ImagePlan& p, const scalar_t* const* lanes, int64_t sH, int64_t sW, double* V, double* Q,
                    double* P, double* acc) {
  const int64_t width = p.x_hi - p.x_lo, ld = width;
  std::fill(V, V + width * kBoxLanes, 0.0);
  std::fill(acc, acc + p.boxes.size() * kBoxLanes, 0.0);
  const EventRow* above = nullptr;  // the previous event row: its spans hold for the rows up to this one
  for (const EventRow& er : p.rows) {
    if (above != nullptr && above->span_end > above->span_begin) {
      for (int64_t y = above->row; y < er.row; ++y)
        for (int64_t s = above->span_begin; s < above->span_end; ++s) {
          const auto [a, b] = p.spans[s];
          box_add_row(lanes, y * sH + a * sW, sH, sW, V + a, ld, b - a);
        }
    }
    above = &er;
    const int64_t* e = p.edges.data() + er.edge_begin;
    const int64_t ne = er.edge_end - er.edge_begin;
    if (e[ne - 1] - e[0] < kDenseSegment * (ne - 1)) {
      box_edge_sums_dense(V, ld, e, ne, Q, P);
    } else {
      box_edge_sums(V, ld, e, ne, Q);
    }
    for (int64_t q = er.ev_begin; q < er.ev_end; ++q) {
      const Event& ev = p.events[q];
      double* a = acc + ev.box * kBoxLanes;
      const double* qa = Q + ev.a * kBoxLanes;
      const double* qb = Q + ev.b * kBoxLanes;
#pragma omp simd
      for (int c = 0; c < kBoxLanes; ++c) a[c] += ev.sign * (qb[c] - qa[c]);
    }
  }
}

// Writes row `y` of every painted lane from R (zeros outside [x_lo, x_hi)).
template <typename scalar_t>
KDOPS_INLINE void box_emit_row(scalar_t* const* lanes, int cb, int64_t y, int64_t W, int64_t x_lo, int64_t x_hi,
                               const double* R, int64_t ld) {
  for (int c = 0; c < cb; ++c) {
    scalar_t* dst = lanes[c] + y * W;
    const double* r = R + c * ld - x_lo;
    std::fill(dst, dst + x_lo, scalar_t(0));
#pragma omp simd
    for (int64_t x = x_lo; x < x_hi; ++x) dst[x] = static_cast<scalar_t>(r[x]);
    std::fill(dst + x_hi, dst + W, scalar_t(0));
  }
}

constexpr int64_t kPaintAhead = 8;  // events between a box's value prefetch and its use

// Paints one block of cb channels into its planes; box k's values for the block's channels
// are vp[k * sK + lane].
template <typename scalar_t>
void box_paint_block(const ImagePlan& p, const scalar_t* vp, int64_t sK, int cb, scalar_t* const* lanes,
                     int64_t H, int64_t W, double* R, double* d) {
  int64_t y = 0;
  if (!p.rows.empty()) {
    const int64_t width = p.x_hi - p.x_lo, ld = width;
    std::fill(R, R + width * kBoxLanes, 0.0);
    y = p.rows.front().row;
    for (int c = 0; c < cb; ++c) std::fill(lanes[c], lanes[c] + y * W, scalar_t(0));
    for (const EventRow& er : p.rows) {
      for (; y < er.row; ++y) box_emit_row(lanes, cb, y, W, p.x_lo, p.x_hi, R, ld);
      const int64_t* e = p.edges.data() + er.edge_begin;
      const int64_t ne = er.edge_end - er.edge_begin;
      std::fill(d, d + ne * kBoxLanes, 0.0);
      for (int64_t q = er.ev_begin; q < er.ev_end; ++q) {
        const Event& ev = p.events[q];
        // box values are rows of (K,C) in event order, i.e. scattered: fetch a few events ahead
        // (on into the next event rows, whose fetches then overlap this row's sweep)
        if (q + kPaintAhead < int64_t(p.events.size()))
          __builtin_prefetch(vp + p.boxes[p.events[q + kPaintAhead].box] * sK);
        const scalar_t* v = vp + p.boxes[ev.box] * sK;
        const double s = -ev.sign * p.scale[ev.box];
        double* da = d + ev.a * kBoxLanes;
        double* db = d + ev.b * kBoxLanes;
        for (int c = 0; c < cb; ++c) {
          const double val = s * double(v[c]);
          da[c] += val;
          db[c] -= val;
        }
      }
      // (a branch-free transposed variant, as pool has for many short segments, measured 5%
      // slower here: painting is bound by writing the maps)
      double run[kBoxLanes] = {};
      for (int64_t i = 0; i + 1 < ne; ++i) {
        const double* di = d + i * kBoxLanes;
#pragma omp simd
        for (int c = 0; c < kBoxLanes; ++c) run[c] += di[c];
        int64_t x = e[i];
        for (; x + 4 <= e[i + 1]; x += 4)
          for (int c = 0; c < kBoxLanes; ++c) box_store(R + c * ld + x, box_load(R + c * ld + x) + run[c]);
        for (; x < e[i + 1]; ++x)
          for (int c = 0; c < kBoxLanes; ++c) R[c * ld + x] += run[c];
      }
    }
  }
  for (int c = 0; c < cb; ++c) std::fill(lanes[c] + y * W, lanes[c] + H * W, scalar_t(0));  // below every box
}

}  // namespace KDOPS_ISA
}  // namespace kdops
