// CUDA kernels of kdops::ms_deform_attn_fwd / kdops::ms_deform_attn_bwd (one CUDA backend; the
// other is Triton, selected with KDOPS_MSDA_BACKEND=triton, see kdops/ops/ms_deform_attn.py).
//
// Layout: a block is (CX, CY) threads; threadIdx.x runs over the D channels of one (n, q, m)
// triple (CX = D rounded up to a warp multiple), threadIdx.y over CY triples. Neighbouring
// threads read neighbouring channels of one value row, so corner gathers are coalesced.
// All offsets are int64; the level geometry is read from device memory and every corner read
// is masked to lie inside `value`, so inconsistent spatial_shapes cannot cause an
// out-of-bounds access (they are validated on the host only when they live on the CPU).
//
// Value gradient: either fp32 atomics into an fp32 accumulator (fp64 for fp64; cast at the end,
// never fp16/bf16 atomics), or -- deterministic mode -- a gather: samples are stably sorted by
// the top-left corner they touch and one thread group per value row binary-searches the four
// neighbouring segments, summing contributions in sorted order (no atomics at all).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace kdops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSentinel = int64_t(1) << 62;

struct Geo {
  int64_t H, W, start;
  bool inside;
  int64_t h0, w0;
};

template <typename acc>
__device__ __forceinline__ Geo geometry(const int64_t* shapes, const int64_t* starts, int64_t l, acc x, acc y,
                                        acc& lh, acc& lw) {
  Geo g;
  g.H = shapes[2 * l];
  g.W = shapes[2 * l + 1];
  g.start = starts[l];
  const acc h_im = y * acc(g.H) - acc(0.5), w_im = x * acc(g.W) - acc(0.5);
  g.inside = h_im > acc(-1) && w_im > acc(-1) && h_im < acc(g.H) && w_im < acc(g.W);
  const acc hf = g.inside ? floor(h_im) : acc(0), wf = g.inside ? floor(w_im) : acc(0);
  g.h0 = static_cast<int64_t>(hf);
  g.w0 = static_cast<int64_t>(wf);
  lh = g.inside ? h_im - hf : acc(0);
  lw = g.inside ? w_im - wf : acc(0);
  return g;
}

// Row of corner (h, w) in value's S axis, or -1 when it is outside the map or outside [0, S).
__device__ __forceinline__ int64_t corner_row(const Geo& g, int64_t h, int64_t w, int64_t S) {
  if (!g.inside || h < 0 || h >= g.H || w < 0 || w >= g.W) return -1;
  const int64_t row = g.start + h * g.W + w;
  return (row >= 0 && row < S) ? row : -1;
}

template <typename scalar_t, typename acc>
__global__ void fwd_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                           const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                           const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t NQM, int64_t S,
                           int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;  // (n, q, m)
  const int64_t d = threadIdx.x;
  if (t >= NQM || d >= D) return;
  const int64_t m = t % M, n = t / (Q * M);
  acc sum = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t s = (t * L + l) * P + p;
      acc lh, lw;
      const Geo g = geometry<acc>(shapes, starts, l, acc(loc[2 * s]), acc(loc[2 * s + 1]), lh, lw);
      if (!g.inside) continue;
      const acc a = acc(attn[s]);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t row = corner_row(g, g.h0 + c / 2, g.w0 + c % 2, S);
        if (row < 0) continue;
        const acc w = a * (c / 2 ? lh : acc(1) - lh) * (c % 2 ? lw : acc(1) - lw);
        sum += w * acc(value[((n * S + row) * M + m) * D + d]);
      }
    }
  }
  out[t * D + d] = static_cast<scalar_t>(sum);
}

// Sum of v over the CX threads of this row of the block, in a fixed order; valid in threadIdx.x == 0.
template <typename acc>
__device__ __forceinline__ acc row_sum(acc v, acc* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  acc* mine = smem + threadIdx.y * warps;
  __syncthreads();
  if (threadIdx.x % 32 == 0) mine[threadIdx.x / 32] = v;
  __syncthreads();
  acc total = 0;
  for (int w = 0; w < warps; ++w) total += mine[w];
  return total;
}

template <typename scalar_t, typename acc, bool GRAD_VALUE, bool GRAD_SAMPLING>
__global__ void bwd_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ value,
                           const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                           const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                           acc* __restrict__ gv, scalar_t* __restrict__ gloc, scalar_t* __restrict__ gattn,
                           int64_t NQM, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  acc* smem = reinterpret_cast<acc*>(smem_raw);
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t d = threadIdx.x;
  // no early return: every thread takes part in row_sum's barriers
  const bool live = t < NQM && d < D;
  const int64_t tt = t < NQM ? t : 0;
  const int64_t m = tt % M, n = tt / (Q * M);
  const acc g = live ? acc(go[tt * D + d]) : acc(0);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t s = (tt * L + l) * P + p;
      acc lh, lw;
      const Geo geo = geometry<acc>(shapes, starts, l, acc(loc[2 * s]), acc(loc[2 * s + 1]), lh, lw);
      const acc a = acc(attn[s]);
      acc val = 0, gh = 0, gw = 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t row = live ? corner_row(geo, geo.h0 + c / 2, geo.w0 + c % 2, S) : -1;
        if (row < 0) continue;
        const acc fh = c / 2 ? lh : acc(1) - lh, fw = c % 2 ? lw : acc(1) - lw;
        const int64_t off = ((n * S + row) * M + m) * D + d;
        if (GRAD_SAMPLING) {
          const acc dot = g * acc(value[off]);
          val += fh * fw * dot;
          gh += (c / 2 ? acc(1) : acc(-1)) * fw * dot;
          gw += (c % 2 ? acc(1) : acc(-1)) * fh * dot;
        }
        if (GRAD_VALUE) atomicAdd(gv + off, a * fh * fw * g);
      }
      if (GRAD_SAMPLING) {
        val = row_sum(val, smem);
        gh = row_sum(gh, smem);
        gw = row_sum(gw, smem);
        if (threadIdx.x == 0 && t < NQM) {
          gattn[s] = static_cast<scalar_t>(val);
          gloc[2 * s] = static_cast<scalar_t>(a * gw * acc(geo.W));
          gloc[2 * s + 1] = static_cast<scalar_t>(a * gh * acc(geo.H));
        }
      }
    }
  }
}

// Deterministic value gradient, step 1: the sort key of every sample.
template <typename scalar_t, typename acc>
__global__ void keys_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                            const int64_t* __restrict__ pad, const scalar_t* __restrict__ loc, int64_t* __restrict__ keys,
                            int64_t n_keys, int64_t M, int64_t Q, int64_t L, int64_t P, int64_t SPAD) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (n, q, m, l, p)
  if (s >= n_keys) return;
  const int64_t l = (s / P) % L, nqm = s / (L * P), m = nqm % M, n = nqm / (Q * M);
  acc lh, lw;
  const Geo g = geometry<acc>(shapes, starts, l, acc(loc[2 * s]), acc(loc[2 * s + 1]), lh, lw);
  keys[s] = g.inside ? (n * M + m) * SPAD + pad[l] + (g.h0 + 1) * (g.W + 1) + (g.w0 + 1) : kSentinel;
}

__device__ __forceinline__ int64_t lower_bound(const int64_t* keys, int64_t n, int64_t target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Step 2: thread (row (n, s, m), channel d) sums the contributions of the samples whose
// top-left corner is one of the four that put this row among their corners.
template <typename scalar_t, typename acc>
__global__ void gather_kernel(const scalar_t* __restrict__ go, const int64_t* __restrict__ shapes,
                              const int64_t* __restrict__ starts, const int64_t* __restrict__ pad,
                              const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                              const int64_t* __restrict__ skeys, const int64_t* __restrict__ perm,
                              scalar_t* __restrict__ gv, int64_t NSM, int64_t n_keys, int64_t S, int64_t M, int64_t D,
                              int64_t L, int64_t P, int64_t SPAD) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t d = threadIdx.x;
  if (t >= NSM || d >= D) return;
  const int64_t m = t % M, s = (t / M) % S, n = t / (M * S);
  int64_t l = 0;
  for (int64_t j = 1; j < L; ++j)
    if (starts[j] <= s) l = j;
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], r = s - starts[l];
  acc sum = 0;
  if (r >= 0 && r < H * W) {
    const int64_t h = r / W, w = r % W, plane = (n * M + m) * SPAD + pad[l];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int dh = c / 2, dw = c % 2;
      const int64_t key = plane + (h - dh + 1) * (W + 1) + (w - dw + 1);
      const int64_t hi = lower_bound(skeys, n_keys, key + 1);
      for (int64_t i = lower_bound(skeys, n_keys, key); i < hi; ++i) {
        const int64_t smp = perm[i];
        const acc h_im = acc(loc[2 * smp + 1]) * acc(H) - acc(0.5);
        const acc w_im = acc(loc[2 * smp]) * acc(W) - acc(0.5);
        const acc lh = h_im - floor(h_im), lw = w_im - floor(w_im);
        const acc wgt = acc(attn[smp]) * (dh ? lh : acc(1) - lh) * (dw ? lw : acc(1) - lw);
        sum += wgt * acc(go[(smp / (L * P)) * D + d]);
      }
    }
  }
  gv[t * D + d] = static_cast<scalar_t>(sum);
}

dim3 block_for(int64_t D) {
  const int cx = static_cast<int>(((D + 31) / 32) * 32);
  return dim3(cx, std::max(1, kThreads / cx));
}

int64_t blocks_for(int64_t rows, const dim3& block) {
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "kdops::ms_deform_attn (CUDA): problem too large for one launch");
  return blocks;
}

void check(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
           const at::Tensor& attn) {
  TORCH_CHECK(value.is_cuda() && shapes.is_cuda() && starts.is_cuda() && loc.is_cuda() && attn.is_cuda(),
              "kdops::ms_deform_attn (CUDA): every tensor must be on the GPU");
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5, "kdops::ms_deform_attn: bad ranks");
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "kdops::ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2) && loc.size(3) == shapes.size(0) &&
                  starts.size(0) == shapes.size(0) && loc.size(5) == 2 && attn.sizes() == loc.sizes().slice(0, 5),
              "kdops::ms_deform_attn: inconsistent shapes");
  TORCH_CHECK(value.size(3) <= 1024, "kdops::ms_deform_attn (CUDA): channels per head must be <= 1024");
}

at::Tensor fwd_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  const auto shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t N = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3), Q = loc.size(1), L = loc.size(3),
                P = loc.size(4);
  auto out = at::empty({N, Q, M * D}, v.options());
  if (out.numel() == 0) return out;
  const dim3 block = block_for(D);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_fwd_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc><<<blocks_for(N * Q * M, block), block, 0, stream>>>(
        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
        attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N * Q * M, S, M, D, Q, L, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights, bool grad_value,
                                                        bool grad_sampling, bool deterministic) {
  check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  const auto v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  const auto shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const auto go = grad_output.contiguous();
  const int64_t N = v.size(0), S = v.size(1), M = v.size(2), D = v.size(3), Q = loc.size(1), L = loc.size(3),
                P = loc.size(4);
  TORCH_CHECK(go.numel() == N * Q * M * D && go.scalar_type() == v.scalar_type(),
              "kdops::ms_deform_attn_bwd: grad_output must be (N,Q,M*D) in the dtype of value");
  deterministic = deterministic || at::globalContext().deterministicAlgorithms();
  const auto empty = at::empty({0}, v.options());
  auto gloc = grad_sampling ? at::zeros_like(loc) : empty;
  auto gattn = grad_sampling ? at::zeros_like(attn) : empty;
  const bool atomic = grad_value && !deterministic;
  const auto acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gv_acc = atomic ? at::zeros(v.sizes(), v.options().dtype(acc_type)) : empty;
  at::Tensor gv = empty;
  const dim3 block = block_for(D);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t NQM = N * Q * M, n_keys = NQM * L * P;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_bwd_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc) * block.y * (block.x / 32);
    if (n_keys > 0 && (atomic || grad_sampling)) {
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(NQM, block), block, smem, stream>>>(
            go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), atomic ? gv_acc.data_ptr<acc>() : nullptr,
            grad_sampling ? gloc.data_ptr<scalar_t>() : nullptr, grad_sampling ? gattn.data_ptr<scalar_t>() : nullptr,
            NQM, S, M, D, Q, L, P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (atomic && grad_sampling) launch(bwd_kernel<scalar_t, acc, true, true>);
      else if (atomic) launch(bwd_kernel<scalar_t, acc, true, false>);
      else launch(bwd_kernel<scalar_t, acc, false, true>);
    }
    if (atomic) {
      gv = gv_acc.scalar_type() == v.scalar_type() ? gv_acc : gv_acc.to(v.scalar_type());
    } else if (grad_value) {
      gv = at::empty_like(v);
      if (gv.numel() == 0) return;
      const auto HW = shapes.select(1, 0) * shapes.select(1, 1);
      const auto padded = at::where(HW > 0, (shapes.select(1, 0) + 1) * (shapes.select(1, 1) + 1), at::zeros_like(HW));
      const auto pad = (at::cumsum(padded, 0) - padded).contiguous();
      const int64_t SPAD = 2 * S + 2 * L + 1;  // >= sum (H+1)(W+1) over non-empty levels
      auto keys = at::empty({n_keys}, shapes.options());
      if (n_keys > 0) {
        keys_kernel<scalar_t, acc><<<(n_keys + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
            shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), pad.data_ptr<int64_t>(),
            loc.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), n_keys, M, Q, L, P, SPAD);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const auto skeys = std::get<0>(sorted).contiguous(), perm = std::get<1>(sorted).contiguous();
      gather_kernel<scalar_t, acc><<<blocks_for(N * S * M, block), block, 0, stream>>>(
          go.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), pad.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), skeys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
          gv.data_ptr<scalar_t>(), N * S * M, n_keys, S, M, D, L, P, SPAD);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gv, gloc, gattn};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("ms_deform_attn_fwd", &fwd_cuda);
  m.impl("ms_deform_attn_bwd", &bwd_cuda);
}

}  // namespace kdops
