// CPU kernels of kdops::roi_align_fwd / _bwd: RoIAlign over FPN levels (mmdet's SingleRoIExtractor
// over mmcv's RoIAlign, average mode).
//
// The math is mmcv's roi_align_forward_cpu, term for term: the same sample positions, bilinear
// weights, summation order per bin (samples row by row, each sample's w1 v1 + w2 v2 + w3 v3 + w4 v4)
// and the division by the sample count. What differs is how the work is laid out:
// - Bilinear weights are separable: a sample's row (y_low, y_high, ly, hy, inside) depends on
//   (ph, iy) only and its column on (pw, ix) only. Each RoI keeps out_h*g_h row entries and
//   out_w*g_w column entries instead of mmcv's out_h*out_w*g_h*g_w pre_calc table.
// - Every level in one call: a RoI reads the level it is mapped to (mmdet loops over levels with
//   boolean masks and scatters the results back).
// - Forward: one task per block of RoIs, all channels of a RoI in a row (its rows and columns are
//   computed once). mmcv's CPU kernel runs on one thread.
// - Backward: deterministic without atomics. RoIs are bucketed by (level, image), stably; a task
//   owns whole gradient planes (level, image, channel), zero-fills one and adds into it every RoI
//   of its bucket in RoI order -- the same order for any thread count, bitwise. Float planes
//   accumulate in place; half/bfloat16 planes in a float buffer of one plane per task.
// Rows whose level is not in [0,L) or whose image int(rois[r,0]) is not in [0,N) are zero and get
// no gradient. Sample positions outside [-1,H]x[-1,W] add nothing (mmcv); every read is clamped
// to the map. A non-finite RoI has no samples (its features are zero); a RoI whose adaptive
// sampling grid exceeds kMaxGrid per axis is refused before any work (it would be ~10^5 feature
// pixels wide: a box in the wrong units).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

constexpr int64_t kMaxGrid = int64_t(1) << 14;

// One sample coordinate along an axis: the two neighbouring pixel offsets (times the axis
// stride) and their weights; inside = false for samples outside [-1, size] (they add nothing).
template <typename acc>
struct AxisSample {
  int64_t lo, hi;
  acc l, h;
  bool inside;
};

// mmcv's bilinear_interpolate, one axis: v in feature pixels, size > 0.
template <typename acc>
AxisSample<acc> axis_sample(acc v, int64_t size, int64_t stride) {
  AxisSample<acc> s{0, 0, acc(0), acc(0), false};
  if (!(v >= acc(-1)) || v > acc(size)) return s;  // also NaN
  if (v <= acc(0)) v = acc(0);
  int64_t lo = static_cast<int64_t>(v), hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    v = static_cast<acc>(lo);
  } else {
    hi = lo + 1;
  }
  s.l = v - static_cast<acc>(lo);
  s.h = acc(1) - s.l;
  s.lo = lo * stride;
  s.hi = hi * stride;
  s.inside = true;
  return s;
}

// A RoI's geometry on its level: image, sample grid and the separable sample entries.
template <typename acc>
struct RoiGeom {
  int64_t n = -1, level = -1, gh = 0, gw = 0;
  acc count = acc(1);
  std::vector<AxisSample<acc>> ys, xs;  // (out_h * gh), (out_w * gw)
};

struct LevelShape {
  int64_t N, H, W, sN, sC, sH, sW;
};

// Sample grid per axis: sampling_ratio, or mmcv's ceil(roi size / bins); non-finite -> 0 samples.
// Returns -1 when the grid is larger than kMaxGrid.
template <typename acc>
int64_t grid_size(acc size, int64_t bins, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const acc g = std::ceil(size / static_cast<acc>(bins));
  if (!std::isfinite(g) || g <= acc(0)) return 0;
  if (g > acc(kMaxGrid)) return -1;
  return static_cast<int64_t>(g);
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
bool roi_geom(RoiGeom<acc>& g, const scalar_t* roi, int64_t level, const std::vector<LevelShape>& shapes,
              const std::vector<double>& scales, int64_t oh, int64_t ow, int64_t sampling_ratio, bool aligned) {
  g.n = -1;
  g.ys.clear();
  g.xs.clear();
  const int64_t L = static_cast<int64_t>(shapes.size());
  if (level < 0 || level >= L) return true;
  const auto& s = shapes[level];
  const acc b = std::trunc(static_cast<acc>(roi[0]));  // mmcv: int roi_batch_ind = offset_rois[0]
  if (!(b >= acc(0)) || !(b < static_cast<acc>(s.N))) return true;  // also NaN
  if (s.H == 0 || s.W == 0) return true;
  const acc scale = static_cast<acc>(scales[level]);
  const acc offset = aligned ? acc(0.5) : acc(0);
  const acc x1 = static_cast<acc>(roi[1]) * scale - offset, y1 = static_cast<acc>(roi[2]) * scale - offset;
  const acc x2 = static_cast<acc>(roi[3]) * scale - offset, y2 = static_cast<acc>(roi[4]) * scale - offset;
  acc rw = x2 - x1, rh = y2 - y1;
  if (!aligned) {  // mmcv: force malformed RoIs to be 1x1
    rw = std::max(rw, acc(1));
    rh = std::max(rh, acc(1));
  }
  const acc bh = rh / static_cast<acc>(oh), bw = rw / static_cast<acc>(ow);
  const int64_t gh = grid_size(rh, oh, sampling_ratio), gw = grid_size(rw, ow, sampling_ratio);
  if (gh < 0 || gw < 0) return false;
  g.n = static_cast<int64_t>(b);
  g.level = level;
  g.gh = gh;
  g.gw = gw;
  g.count = static_cast<acc>(std::max<int64_t>(gh * gw, 1));
  g.ys.reserve(oh * gh);
  for (int64_t ph = 0; ph < oh; ++ph)
    for (int64_t iy = 0; iy < gh; ++iy) {
      const acc y = y1 + static_cast<acc>(ph) * bh + static_cast<acc>(iy + .5f) * bh / static_cast<acc>(gh);
      g.ys.push_back(axis_sample(y, s.H, s.sH));
    }
  g.xs.reserve(ow * gw);
  for (int64_t pw = 0; pw < ow; ++pw)
    for (int64_t ix = 0; ix < gw; ++ix) {
      const acc x = x1 + static_cast<acc>(pw) * bw + static_cast<acc>(ix + .5f) * bw / static_cast<acc>(gw);
      g.xs.push_back(axis_sample(x, s.W, s.sW));
    }
  return true;
}

// Calls f(y, x) for every sample of bin (ph, pw) that lies in the map, rows in order: mmcv's
// summation order, shared by the forward and the backward.
template <typename acc, typename F>
KDOPS_INLINE void for_each_sample(const RoiGeom<acc>& g, int64_t ph, int64_t pw, F&& f) {
  const AxisSample<acc>* ys = g.ys.data() + ph * g.gh;
  const AxisSample<acc>* xs = g.xs.data() + pw * g.gw;
  for (int64_t iy = 0; iy < g.gh; ++iy) {
    if (!ys[iy].inside) continue;
    for (int64_t ix = 0; ix < g.gw; ++ix)
      if (xs[ix].inside) f(ys[iy], xs[ix]);
  }
}

struct Args {
  std::vector<LevelShape> shapes;
  std::vector<double> scales;
  int64_t R, C;
};

Args check_args(const char* op, at::IntArrayRef sizes_or_empty, at::TensorList features, const at::Tensor& rois,
                const at::Tensor& levels, at::ArrayRef<double> scales, int64_t sampling_ratio,
                at::ScalarType dtype) {
  Args a;
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (R,5) [batch, x1, y1, x2, y2], got ",
              rois.sizes());
  TORCH_CHECK(rois.scalar_type() == dtype, op, ": rois must have the features' dtype ", dtype, ", got ",
              rois.scalar_type());
  a.R = rois.size(0);
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == a.R && levels.scalar_type() == at::kLong, op,
              ": levels must be an (R,) int64 tensor with R = ", a.R);
  TORCH_CHECK(sampling_ratio >= 0 && sampling_ratio <= kMaxGrid, op, ": sampling_ratio must be in [0, ", kMaxGrid,
              "], got ", sampling_ratio);
  if (!features.empty()) {
    a.C = features[0].size(1);
    for (const auto& f : features) {
      TORCH_CHECK(f.dim() == 4 && f.size(1) == a.C && f.scalar_type() == dtype, op,
                  ": levels must be (N,C,H,W) with one C and one dtype");
      TORCH_CHECK(f.size(0) == features[0].size(0), op, ": levels must have one batch size N");
      a.shapes.push_back({f.size(0), f.size(2), f.size(3), f.stride(0), f.stride(1), f.stride(2), f.stride(3)});
    }
  } else {
    TORCH_CHECK(!sizes_or_empty.empty() && sizes_or_empty.size() % 4 == 0, op,
                ": sizes must hold 4 sizes (N,C,H,W) per level");
    const int64_t L = sizes_or_empty.size() / 4;
    a.C = sizes_or_empty[1];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t N = sizes_or_empty[4 * l], C = sizes_or_empty[4 * l + 1], H = sizes_or_empty[4 * l + 2],
                    W = sizes_or_empty[4 * l + 3];
      TORCH_CHECK(N >= 0 && H >= 0 && W >= 0 && C == a.C && N == sizes_or_empty[0], op,
                  ": sizes must be (N,C,H,W) per level with one N and C, non-negative");
      a.shapes.push_back({N, H, W, C * H * W, H * W, W, 1});
    }
  }
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == static_cast<int64_t>(a.shapes.size()), op,
              ": one scale per level is needed, got ", scales.size(), " for ", a.shapes.size(), " levels");
  for (double s : scales) TORCH_CHECK(std::isfinite(s) && s > 0, op, ": scales must be positive and finite");
  a.scales.assign(scales.begin(), scales.end());
  return a;
}

[[noreturn]] void refuse_grid(const char* op, int64_t r) {
  TORCH_CHECK(false, op, ": RoI ", r, " needs more than ", kMaxGrid,
              " samples per bin along an axis (sampling_ratio=0 adapts to its size): it is ~10^5 feature "
              "pixels wide; are the boxes in input-image pixels and the strides right?");
}

at::Tensor roi_align_fwd_cpu(at::TensorList features, const at::Tensor& rois_, const at::Tensor& levels_,
                             at::ArrayRef<double> scales, int64_t oh, int64_t ow, int64_t sampling_ratio,
                             bool aligned) {
  const char* op = "kdops::roi_align_fwd";
  TORCH_CHECK(!features.empty(), op, ": needs at least one level");
  TORCH_CHECK(oh > 0 && ow > 0, op, ": out_h and out_w must be positive, got ", oh, "x", ow);
  const auto rois = rois_.contiguous();
  const auto levels = levels_.contiguous();
  const Args a = check_args(op, {}, features, rois, levels, scales, sampling_ratio, features[0].scalar_type());
  const int64_t R = a.R, C = a.C;
  auto out = at::zeros({R, C, oh, ow}, features[0].options());
  if (R == 0 || C == 0) return out;
  const int64_t* lv = levels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* rp = rois.data_ptr<scalar_t>();
    std::vector<const scalar_t*> base;
    for (const auto& f : features) base.push_back(f.data_ptr<scalar_t>());
    std::atomic<int64_t> refused{-1};
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
      RoiGeom<acc> g;
      for (int64_t r = begin; r < end; ++r) {
        if (!roi_geom<scalar_t>(g, rp + 5 * r, lv[r], a.shapes, a.scales, oh, ow, sampling_ratio, aligned)) {
          refused.store(r);
          return;
        }
        if (g.n < 0) continue;
        const auto& s = a.shapes[g.level];
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* p = base[g.level] + g.n * s.sN + c * s.sC;
          scalar_t* dst = o + (r * C + c) * oh * ow;
          for (int64_t ph = 0; ph < oh; ++ph) {
            for (int64_t pw = 0; pw < ow; ++pw) {
              acc sum = acc(0);
              for_each_sample(g, ph, pw, [&](const AxisSample<acc>& y, const AxisSample<acc>& x) {
                sum += y.h * x.h * static_cast<acc>(p[y.lo + x.lo]) + y.h * x.l * static_cast<acc>(p[y.lo + x.hi]) +
                       y.l * x.h * static_cast<acc>(p[y.hi + x.lo]) + y.l * x.l * static_cast<acc>(p[y.hi + x.hi]);
              });
              dst[ph * ow + pw] = static_cast<scalar_t>(sum / g.count);
            }
          }
        }
      }
    });
    if (refused.load() >= 0) refuse_grid(op, refused.load());
  });
  return out;
}

std::vector<at::Tensor> roi_align_bwd_cpu(const at::Tensor& grad_, const at::Tensor& rois_, const at::Tensor& levels_,
                                          at::ArrayRef<double> scales, int64_t sampling_ratio, bool aligned,
                                          c10::SymIntArrayRef sizes_) {
  const char* op = "kdops::roi_align_bwd";
  const auto sizes = C10_AS_INTARRAYREF_SLOW(sizes_);
  const auto rois = rois_.contiguous();
  const auto levels = levels_.contiguous();
  const Args a = check_args(op, sizes, {}, rois, levels, scales, sampling_ratio, grad_.scalar_type());
  TORCH_CHECK(grad_.dim() == 4 && grad_.size(0) == a.R && grad_.size(1) == a.C && grad_.size(2) > 0 &&
                  grad_.size(3) > 0,
              op, ": grad must be (R,C,out_h,out_w) with R = ", a.R, " and C = ", a.C, ", got ", grad_.sizes());
  const auto grad = grad_.contiguous();
  const int64_t R = a.R, C = a.C, L = static_cast<int64_t>(a.shapes.size());
  const int64_t oh = grad.size(2), ow = grad.size(3);
  std::vector<at::Tensor> outs;
  for (const auto& s : a.shapes) outs.push_back(at::empty({s.N, C, s.H, s.W}, grad.options()));  // all filled below
  const int64_t N = a.shapes[0].N;
  const int64_t* lv = levels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* rp = rois.data_ptr<scalar_t>();
    // every RoI's geometry once (all of them, in parallel), then buckets (level, image) in RoI order
    std::vector<RoiGeom<acc>> geom(R);
    std::atomic<int64_t> refused{-1};
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        if (!roi_geom<scalar_t>(geom[r], rp + 5 * r, lv[r], a.shapes, a.scales, oh, ow, sampling_ratio, aligned))
          refused.store(r);
    });
    if (refused.load() >= 0) refuse_grid(op, refused.load());
    std::vector<int64_t> bucket(L * N + 1, 0), order;
    for (int64_t r = 0; r < R; ++r)
      if (geom[r].n >= 0) bucket[geom[r].level * N + geom[r].n + 1] += 1;
    for (int64_t b = 0; b < L * N; ++b) bucket[b + 1] += bucket[b];
    order.assign(bucket[L * N], 0);
    {
      std::vector<int64_t> fill(bucket.begin(), bucket.end() - 1);
      for (int64_t r = 0; r < R; ++r)
        if (geom[r].n >= 0) order[fill[geom[r].level * N + geom[r].n]++] = r;
    }
    // planes (image, channel) outer, level inner: every share of the list mixes large and small planes
    std::vector<std::array<int64_t, 3>> planes;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t l = 0; l < L; ++l) planes.push_back({l, n, c});
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    constexpr bool in_place = std::is_same<scalar_t, acc>::value;
    at::parallel_for(0, int64_t(planes.size()), L, [&](int64_t begin, int64_t end) {
      std::vector<acc> buf;
      for (int64_t t = begin; t < end; ++t) {
        const auto [l, n, c] = planes[t];
        const auto& s = a.shapes[l];
        const int64_t HW = s.H * s.W;
        scalar_t* plane = outs[l].data_ptr<scalar_t>() + (n * C + c) * HW;
        acc* q;
        if constexpr (in_place) {
          q = reinterpret_cast<acc*>(plane);
        } else {
          buf.resize(HW);
          q = buf.data();
        }
        std::fill(q, q + HW, acc(0));
        const int64_t b = l * N + n;
        for (int64_t i = bucket[b]; i < bucket[b + 1]; ++i) {
          const int64_t r = order[i];
          const auto& g = geom[r];
          const scalar_t* gr = gp + (r * C + c) * oh * ow;
          // the gradient plane is dense (sizes give sH = W, sW = 1): the geometry's offsets index it
          for (int64_t ph = 0; ph < oh; ++ph) {
            for (int64_t pw = 0; pw < ow; ++pw) {
              const acc gb = static_cast<acc>(gr[ph * ow + pw]);
              for_each_sample(g, ph, pw, [&](const AxisSample<acc>& y, const AxisSample<acc>& x) {
                q[y.lo + x.lo] += gb * (y.h * x.h) / g.count;
                q[y.lo + x.hi] += gb * (y.h * x.l) / g.count;
                q[y.hi + x.lo] += gb * (y.l * x.h) / g.count;
                q[y.hi + x.hi] += gb * (y.l * x.l) / g.count;
              });
            }
          }
        }
        if constexpr (!in_place) {
          for (int64_t k = 0; k < HW; ++k) plane[k] = static_cast<scalar_t>(q[k]);
        }
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("roi_align_fwd", &roi_align_fwd_cpu);
  m.impl("roi_align_bwd", &roi_align_bwd_cpu);
}

}  // namespace kdops
