// CPU kernel of kdops::box_ranges_fwd: image boxes -> inclusive feature-pixel ranges per FPN level.
//
// Bitwise the numbers of the tensor-op path in kdops/ops/box_ranges.py (`_ranges_tensor_ops`, which
// stays the sync-free GPU path): every floating operation there is done here in the same type T
// (float64 for float64 boxes, else float32) and in the same order, each result rounded to T on its
// own, with the per-level constants rounded to T once as the Python's (L,1) columns are:
//
//   center: a = floor(lo/s - 0.5) + 1, then a -= 1 if (a - 0.5) s > lo, then a += 1 if (a + 0.5) s <= lo;
//           b = ceil(hi/s - 0.5) - 1,  then b += 1 if (b + 1.5) s < hi, then b -= 1 if (b + 0.5) s >= hi
//   lgd:    r = size / img (T(1/s), the reciprocal rounded once from float64, without an image);
//           a = ceil(lo r), b = floor(hi r), and b = a - 1 unless hi r - lo r > 0
//   fgd:    a = floor(lo / img * size), b = ceil(hi / img * size)  (lo / s, hi / s without an image)
//
// clip: a range empty on either axis (a > b, b < 0, a > size - 1, or NaN) becomes [1, 1, 0, 0], else
// [max(a, 0), min(b, size - 1)]; no clip: NaN -> 0, then clamped to +-2^40 (inf included). Every value
// is then an integer of magnitude <= 2^40, exact in int64.
//
// Why C++: the tensor ops are ~40 small broadcast kernels (COCO FPN, 5 levels, two cores: 0.3-0.6 ms
// at K = 10 boxes, 1-1.5 ms at K = 1000, much of box_pool's time); this one O(L*K) pass of scalar
// arithmetic takes ~0.015 ms and ~0.1-0.15 ms there.
// Compiled for the x86-64 baseline like every file outside the multi-ISA kernels: no FMA exists
// there, and the pragma below keeps a compiler for an FMA target (aarch64) from contracting
// hi*r - lo*r into one rounding, which would break bitwise equality.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "common.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace kdops {
namespace {

enum class Rule { kCenter, kLgd, kFgd };

// Unclipped inclusive range [a, b] of one axis. lo, hi: box coordinates; size: the map's extent on
// this axis; s: stride; inv: T(1/s) (LGD); img: the image extent (used when kImg).
template <typename T, Rule R, bool kImg>
KDOPS_INLINE void axis_range(T lo, T hi, T size, T s, T inv, T img, T& a, T& b) {
  if constexpr (R == Rule::kCenter) {
    a = std::floor(lo / s - T(0.5)) + T(1);
    a = (a - T(0.5)) * s > lo ? a - T(1) : a;
    a = (a + T(0.5)) * s <= lo ? a + T(1) : a;
    b = std::ceil(hi / s - T(0.5)) - T(1);
    b = (b + T(1.5)) * s < hi ? b + T(1) : b;
    b = (b + T(0.5)) * s >= hi ? b - T(1) : b;
  } else if constexpr (R == Rule::kLgd) {
    const T r = kImg ? size / img : inv;
    const T lo_r = lo * r, hi_r = hi * r;
    a = std::ceil(lo_r);
    b = hi_r - lo_r > T(0) ? std::floor(hi_r) : a - T(1);  // zero-size (or inverted, or NaN) boxes cover nothing
  } else if constexpr (kImg) {
    a = std::floor(lo / img * size);
    b = std::ceil(hi / img * size);
  } else {
    a = std::floor(lo / s);
    b = std::ceil(hi / s);
  }
}

template <typename T>
KDOPS_INLINE int64_t unclipped(T v) {
  constexpr T kMax = T(1099511627776.0);  // 2^40
  return std::isnan(v) ? 0 : static_cast<int64_t>(v < -kMax ? -kMax : (v > kMax ? kMax : v));
}

// Boxes [k0, k1) of one level. img points at (height, width) pairs img_step apart: one pair per box
// (step 2) or one pair for all (step 0). Rule, image and clip are template arguments, so the loop
// carries no per-box branch on them.
template <typename T, Rule R, bool kImg, bool kClip>
void level_ranges(const T* box, const T* img, int64_t img_step, T H, T W, T s, T inv, int64_t k0, int64_t k1,
                  int64_t* out) {
  const T lim_x = W - T(1), lim_y = H - T(1);
  for (int64_t k = k0; k < k1; ++k) {
    const T* b = box + 4 * k;
    const T ih = kImg ? img[img_step * k] : T(0), iw = kImg ? img[img_step * k + 1] : T(0);
    T xa, xb, ya, yb;
    axis_range<T, R, kImg>(b[0], b[2], W, s, inv, iw, xa, xb);
    axis_range<T, R, kImg>(b[1], b[3], H, s, inv, ih, ya, yb);
    int64_t* o = out + 4 * k;
    if constexpr (kClip) {
      // (bitwise | : no short-circuit branches)
      const bool empty = (xa > xb) | (xb < T(0)) | (xa > lim_x) | std::isnan(xa) | std::isnan(xb) |  //
                         (ya > yb) | (yb < T(0)) | (ya > lim_y) | std::isnan(ya) | std::isnan(yb);
      // selects on the floats, then exact casts (no NaN or out-of-range value reaches a cast)
      o[0] = static_cast<int64_t>(empty ? T(1) : (xa < T(0) ? T(0) : xa));
      o[1] = static_cast<int64_t>(empty ? T(1) : (ya < T(0) ? T(0) : ya));
      o[2] = static_cast<int64_t>(empty ? T(0) : (xb > lim_x ? lim_x : xb));
      o[3] = static_cast<int64_t>(empty ? T(0) : (yb > lim_y ? lim_y : yb));
    } else {
      o[0] = unclipped(xa), o[1] = unclipped(ya), o[2] = unclipped(xb), o[3] = unclipped(yb);
    }
  }
}

template <typename T, Rule R, bool kImg>
auto pick_level_fn(bool clip) {
  return clip ? &level_ranges<T, R, kImg, true> : &level_ranges<T, R, kImg, false>;
}

template <typename T>
void ranges_kernel(const T* box, const T* img, int64_t img_step, Rule rule, bool clip, at::IntArrayRef heights,
                   at::IntArrayRef widths, at::ArrayRef<double> strides, int64_t K, int64_t* out) {
  const int64_t L = static_cast<int64_t>(strides.size());
  const bool has_img = img != nullptr;
  auto fn = rule == Rule::kCenter ? pick_level_fn<T, Rule::kCenter, false>(clip)
            : rule == Rule::kLgd  ? (has_img ? pick_level_fn<T, Rule::kLgd, true>(clip)
                                             : pick_level_fn<T, Rule::kLgd, false>(clip))
                                  : (has_img ? pick_level_fn<T, Rule::kFgd, true>(clip)
                                             : pick_level_fn<T, Rule::kFgd, false>(clip));
  // ~10-30 ns a box and level: only very many boxes (> 13K for 5 levels) are worth a thread team.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(L, 1));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t l = 0; l < L; ++l) {
      // as the Python's (L,1) columns: float(v) in float64, rounded once to T
      const T H = static_cast<T>(static_cast<double>(heights[l]));
      const T W = static_cast<T>(static_cast<double>(widths[l]));
      fn(box, img, img_step, H, W, static_cast<T>(strides[l]), static_cast<T>(1.0 / strides[l]), k0, k1,
         out + l * K * 4);
    }
  });
}

at::Tensor box_ranges_fwd_cpu(const at::Tensor& boxes, at::IntArrayRef heights, at::IntArrayRef widths,
                              at::ArrayRef<double> strides, c10::string_view rule_name,
                              const c10::optional<at::Tensor>& image_hw, double image_h, double image_w, bool clip) {
  const char* op = "kdops::box_ranges_fwd";
  const auto bt = boxes.scalar_type();
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must be (K,4), got ", boxes.sizes());
  TORCH_CHECK(bt == at::kFloat || bt == at::kDouble || bt == at::kHalf || bt == at::kBFloat16, op,
              ": boxes must be float32, float64, float16 or bfloat16, got ", bt);
  const int64_t K = boxes.size(0), L = static_cast<int64_t>(strides.size());
  TORCH_CHECK(static_cast<int64_t>(heights.size()) == L && static_cast<int64_t>(widths.size()) == L, op,
              ": heights, widths and strides need one entry per level, got ", heights.size(), ", ", widths.size(),
              " and ", L);
  Rule rule;
  if (rule_name == "center") {
    rule = Rule::kCenter;
  } else if (rule_name == "lgd") {
    rule = Rule::kLgd;
  } else {
    TORCH_CHECK(rule_name == "fgd", op, ": rule must be center, lgd or fgd, got ", std::string(rule_name));
    rule = Rule::kFgd;
  }
  const bool per_box = image_hw.has_value() && image_hw->defined();
  if (per_box) {
    const auto it = image_hw->scalar_type();
    TORCH_CHECK(image_hw->dim() == 2 && image_hw->size(0) == K && image_hw->size(1) == 2, op,
                ": image_hw must be (K,2) with K = ", K, ", got ", image_hw->sizes());
    TORCH_CHECK(it == at::kLong || it == at::kInt || it == at::kFloat || it == at::kDouble, op,
                ": image_hw must be int64, int32, float32 or float64, got ", it);
    TORCH_CHECK(image_h == 0.0 && image_w == 0.0, op, ": pass image_hw or (image_h, image_w), not both");
  } else {
    TORCH_CHECK((image_h > 0.0 && image_w > 0.0) || (image_h == 0.0 && image_w == 0.0), op,
                ": image_h and image_w must both be positive (an image size) or both 0 (none), got ", image_h,
                " and ", image_w);
  }
  const bool has_img = per_box || image_h > 0.0;

  // The math type of the Python (boxes.to(dt)); the conversions are the same torch ops it runs.
  const auto dt = bt == at::kDouble ? at::kDouble : at::kFloat;
  const auto bx = boxes.to(dt).contiguous();
  const auto img = per_box ? image_hw->to(dt).contiguous() : at::Tensor();
  auto out = at::empty({L, K, 4}, boxes.options().dtype(at::kLong));
  if (K == 0 || L == 0) return out;
  // The image as (height, width) pairs: one per box, or the scalar pair for all (step 0).
  const int64_t img_step = per_box ? 2 : 0;
  if (dt == at::kDouble) {
    const double pair[2] = {image_h, image_w};
    const double* ip = per_box ? img.data_ptr<double>() : (has_img ? pair : nullptr);
    ranges_kernel<double>(bx.data_ptr<double>(), ip, img_step, rule, clip, heights, widths, strides, K,
                          out.data_ptr<int64_t>());
  } else {
    // a Python float image size meets float32 tensors as float32 (rounded once), as here
    const float pair[2] = {static_cast<float>(image_h), static_cast<float>(image_w)};
    const float* ip = per_box ? img.data_ptr<float>() : (has_img ? pair : nullptr);
    ranges_kernel<float>(bx.data_ptr<float>(), ip, img_step, rule, clip, heights, widths, strides, K,
                         out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("box_ranges_fwd", &box_ranges_fwd_cpu); }

}  // namespace kdops
