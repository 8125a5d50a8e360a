// CPU kernels of kdops::ms_deform_attn_fwd / kdops::ms_deform_attn_bwd.
//
// Sampling follows mmcv's / Deformable DETR's CUDA kernel (= grid_sample, bilinear, zero
// padding, align_corners=False): pixel coordinates are loc * size - 0.5, a sample is skipped
// when it lies entirely outside the map, each in-range corner contributes its bilinear weight.
//
// Forward: tasks are (n, q, m) triples; each accumulates its D channels in the accumulation
// dtype over L*P samples (inner loop over contiguous channels).
// Backward: tasks are (n, m, l) triples. Task (n, m, l) owns the value-gradient slice of its
// level and head, grad_value[n, start_l : start_l + H_l*W_l, m, :], and the location / weight
// gradients of every (n, q, m, l, p). Nothing is shared between tasks, so there are no atomics
// and results are bitwise reproducible whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

namespace kdops {
namespace {

struct Levels {
  std::vector<int64_t> H, W, start;
};

// Host copies of the level geometry, checked so that no kernel can read outside `value`.
Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "kdops::ms_deform_attn: spatial_shapes must be (L,2)");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
              "kdops::ms_deform_attn: level_start_index must be (L,)");
  const auto ss = spatial_shapes.to(at::kLong).contiguous();
  const auto ls = level_start_index.to(at::kLong).contiguous();
  const int64_t L = ss.size(0);
  Levels lv{std::vector<int64_t>(L), std::vector<int64_t>(L), std::vector<int64_t>(L)};
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    lv.H[l] = ss.data_ptr<int64_t>()[2 * l];
    lv.W[l] = ss.data_ptr<int64_t>()[2 * l + 1];
    lv.start[l] = ls.data_ptr<int64_t>()[l];
    TORCH_CHECK(lv.H[l] >= 0 && lv.W[l] >= 0, "kdops::ms_deform_attn: negative spatial shape");
    TORCH_CHECK(lv.start[l] == total,
                "kdops::ms_deform_attn: level_start_index is inconsistent with spatial_shapes");
    // checked arithmetic: a wrapped H*W could match S and let samples address rows past `value`
    int64_t hw = 0;
    TORCH_CHECK(!__builtin_mul_overflow(lv.H[l], lv.W[l], &hw) && !__builtin_add_overflow(total, hw, &total),
                "kdops::ms_deform_attn: value.size(1) must equal sum(H*W) of spatial_shapes (H*W overflows int64)");
  }
  TORCH_CHECK(total == S, "kdops::ms_deform_attn: value.size(1) must equal sum(H*W) of spatial_shapes");
  return lv;
}

// Corner weights of one sample; returns false when the sample lies wholly outside the map.
template <typename acc>
inline bool corners(acc x, acc y, int64_t H, int64_t W, int64_t& h0, int64_t& w0, acc& lh, acc& lw) {
  const acc h_im = y * acc(H) - acc(0.5), w_im = x * acc(W) - acc(0.5);
  if (!(h_im > acc(-1) && w_im > acc(-1) && h_im < acc(H) && w_im < acc(W))) return false;
  const acc hf = std::floor(h_im), wf = std::floor(w_im);
  h0 = static_cast<int64_t>(hf);
  w0 = static_cast<int64_t>(wf);
  lh = h_im - hf;
  lw = w_im - wf;
  return true;
}

template <typename T>
inline void prefetch(const T* p, size_t bytes, int write) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t b = 0; b < bytes; b += 64) {
    if (write) __builtin_prefetch(c + b, 1); else __builtin_prefetch(c + b, 0);
  }
}

template <typename scalar_t>
void fwd_impl(const scalar_t* value, const Levels& lv, const scalar_t* loc, const scalar_t* attn,
              scalar_t* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t P) {
  using acc = acc_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(lv.H.size());
  const size_t row_bytes = D * sizeof(scalar_t);
  at::parallel_for(0, N * Q * M, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(D);
    std::vector<const scalar_t*> rows(L * P * 4);
    std::vector<acc> wts(L * P * 4);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t % M, n = t / (Q * M);
      const scalar_t* lp = loc + t * L * P * 2;
      const scalar_t* ap = attn + t * L * P;
      // pass 1: the task's corner rows and weights; prefetch them all, so the (random,
      // cache-missing) gathers overlap instead of each waiting on the one before
      int64_t k = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = lv.H[l], W = lv.W[l];
        const scalar_t* vbase = value + ((n * S + lv.start[l]) * M + m) * D;
        for (int64_t p = 0; p < P; ++p, lp += 2, ++ap) {
          int64_t h0, w0;
          acc lh, lw;
          if (!corners<acc>(acc(lp[0]), acc(lp[1]), H, W, h0, w0, lh, lw)) continue;
          const acc a = acc(*ap);
          const int64_t hs[2] = {h0, h0 + 1}, ws[2] = {w0, w0 + 1};
          const acc wh[2] = {1 - lh, lh}, ww[2] = {1 - lw, lw};
          for (int i = 0; i < 2; ++i) {
            if (hs[i] < 0 || hs[i] >= H) continue;
            for (int j = 0; j < 2; ++j) {
              if (ws[j] < 0 || ws[j] >= W) continue;
              const scalar_t* v = vbase + (hs[i] * W + ws[j]) * M * D;
              prefetch(v, row_bytes, 0);
              rows[k] = v;
              wts[k++] = a * wh[i] * ww[j];
            }
          }
        }
      }
      // pass 2: accumulate
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t c = 0; c < k; ++c) {
        const scalar_t* v = rows[c];
        const acc w = wts[c];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) sum[d] += w * acc(v[d]);
      }
      scalar_t* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(sum[d]);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const scalar_t* go, const scalar_t* value, const Levels& lv, const scalar_t* loc,
              const scalar_t* attn, scalar_t* gv, scalar_t* gloc, scalar_t* gattn, int64_t N, int64_t S,
              int64_t M, int64_t D, int64_t Q, int64_t P) {
  using acc = acc_t<scalar_t>;
  constexpr bool direct = std::is_same<acc, scalar_t>::value;  // accumulate in place (fp32/fp64)
  const int64_t L = static_cast<int64_t>(lv.H.size());
  at::parallel_for(0, N * M * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> buf, gsum(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t l = t % L, m = (t / L) % M, n = t / (L * M);
      const int64_t H = lv.H[l], W = lv.W[l], HW = H * W;
      const scalar_t* vbase = value + ((n * S + lv.start[l]) * M + m) * D;
      scalar_t* gvout = gv ? gv + ((n * S + lv.start[l]) * M + m) * D : nullptr;
      acc* gbase = nullptr;
      int64_t grow = D;  // row stride of the value-gradient accumulator
      if (gv) {
        if constexpr (direct) {
          gbase = reinterpret_cast<acc*>(gvout);
          grow = M * D;
          for (int64_t s = 0; s < HW; ++s) std::fill(gbase + s * grow, gbase + s * grow + D, acc(0));
        } else {
          buf.assign(HW * D, acc(0));
          gbase = buf.data();
        }
      }
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t nqm = (n * Q + q) * M + m;
        const scalar_t* g = go + nqm * D;
        const int64_t off = (nqm * L + l) * P;
        // prefetch the query's corner rows first, so their cache misses overlap
        for (int64_t p = 0; p < P; ++p) {
          int64_t h0, w0;
          acc lh, lw;
          const scalar_t* lp = loc + (off + p) * 2;
          if (!corners<acc>(acc(lp[0]), acc(lp[1]), H, W, h0, w0, lh, lw)) continue;
          for (int c = 0; c < 4; ++c) {
            const int64_t h = h0 + c / 2, w = w0 + c % 2;
            if (h < 0 || h >= H || w < 0 || w >= W) continue;
            if (gloc || gattn) prefetch(vbase + (h * W + w) * M * D, D * sizeof(scalar_t), 0);
            if (gbase) prefetch(gbase + (h * W + w) * grow, D * sizeof(acc), 1);
          }
        }
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t* lp = loc + (off + p) * 2;
          int64_t h0, w0;
          acc lh, lw;
          const bool in = corners<acc>(acc(lp[0]), acc(lp[1]), H, W, h0, w0, lh, lw);
          if (!in) {
            if (gloc) gloc[(off + p) * 2] = gloc[(off + p) * 2 + 1] = scalar_t(0);
            if (gattn) gattn[off + p] = scalar_t(0);
            continue;
          }
          const acc a = acc(attn[off + p]);
          const int64_t hs[2] = {h0, h0 + 1}, ws[2] = {w0, w0 + 1};
          const acc wh[2] = {1 - lh, lh}, ww[2] = {1 - lw, lw};
          acc val = 0, gh = 0, gw = 0;  // go . sample, d/dh_im, d/dw_im (before attn)
          for (int i = 0; i < 2; ++i) {
            if (hs[i] < 0 || hs[i] >= H) continue;
            for (int j = 0; j < 2; ++j) {
              if (ws[j] < 0 || ws[j] >= W) continue;
              const int64_t pix = hs[i] * W + ws[j];
              if (gloc || gattn) {
                const scalar_t* v = vbase + pix * M * D;
                acc dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; ++d) dot += acc(g[d]) * acc(v[d]);
                val += wh[i] * ww[j] * dot;
                gh += (i ? acc(1) : acc(-1)) * ww[j] * dot;
                gw += (j ? acc(1) : acc(-1)) * wh[i] * dot;
              }
              if (gbase) {
                const acc w = a * wh[i] * ww[j];
                acc* gp = gbase + pix * grow;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) gp[d] += w * acc(g[d]);
              }
            }
          }
          if (gattn) gattn[off + p] = static_cast<scalar_t>(val);
          if (gloc) {
            gloc[(off + p) * 2] = static_cast<scalar_t>(a * gw * acc(W));
            gloc[(off + p) * 2 + 1] = static_cast<scalar_t>(a * gh * acc(H));
          }
        }
      }
      if constexpr (!direct) {
        if (gv) {
          for (int64_t s = 0; s < HW; ++s)
            for (int64_t d = 0; d < D; ++d) gvout[s * M * D + d] = static_cast<scalar_t>(buf[s * D + d]);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, int64_t L) {
  TORCH_CHECK(value.dim() == 4, "kdops::ms_deform_attn: value must be (N,S,M,D)");
  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == N && loc.size(2) == M && loc.size(3) == L && loc.size(5) == 2,
              "kdops::ms_deform_attn: sampling_locations must be (N,Q,M,L,P,2)");
  TORCH_CHECK(attn.dim() == 5 && attn.sizes() == loc.sizes().slice(0, 5),
              "kdops::ms_deform_attn: attention_weights must be (N,Q,M,L,P)");
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "kdops::ms_deform_attn: value, sampling_locations and attention_weights must share a dtype");
}

at::Tensor ms_deform_attn_fwd_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, sampling_locations, attention_weights, spatial_shapes.size(0));
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const int64_t N = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Q = loc.size(1), P = loc.size(4);
  const Levels lv = read_levels(spatial_shapes, level_start_index, S);
  auto out = at::empty({N, Q, M * D}, v.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_fwd", [&] {
    fwd_impl<scalar_t>(v.data_ptr<scalar_t>(), lv, loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), N, S, M, D, Q, P);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_bwd_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool grad_value, bool grad_sampling, bool /*deterministic*/) {
  check_inputs(value, sampling_locations, attention_weights, spatial_shapes.size(0));
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const int64_t N = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3);
  const int64_t Q = loc.size(1), P = loc.size(4);
  TORCH_CHECK(grad_output.numel() == N * Q * M * D && grad_output.scalar_type() == v.scalar_type(),
              "kdops::ms_deform_attn_bwd: grad_output must be (N,Q,M*D) in the dtype of value");
  const auto go = grad_output.contiguous();
  const Levels lv = read_levels(spatial_shapes, level_start_index, S);
  auto gv = grad_value ? at::empty_like(v) : no_grad_placeholder(v);
  auto gloc = grad_sampling ? at::empty_like(loc) : no_grad_placeholder(v);
  auto gattn = grad_sampling ? at::empty_like(attn) : no_grad_placeholder(v);
  if (grad_value && (Q == 0 || P == 0)) gv.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_bwd", [&] {
    bwd_impl<scalar_t>(go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), lv, loc.data_ptr<scalar_t>(),
                       attn.data_ptr<scalar_t>(), grad_value ? gv.data_ptr<scalar_t>() : nullptr,
                       grad_sampling ? gloc.data_ptr<scalar_t>() : nullptr,
                       grad_sampling ? gattn.data_ptr<scalar_t>() : nullptr, N, S, M, D, Q, P);
  });
  return {gv, gloc, gattn};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("ms_deform_attn_fwd", &ms_deform_attn_fwd_cpu);
  m.impl("ms_deform_attn_bwd", &ms_deform_attn_bwd_cpu);
}

}  // namespace kdops
