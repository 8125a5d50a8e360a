// Dense-head tensors as strided (N,H,W,J,C) views, and the tiles the kernels of dense-head
// losses (BCKD; HEAD and UniKD next) work on.
//
// mmdet's (N,J*C,H,W) head outputs and flattened (A,C) tensors are both such views, so no
// permute copy is made. Work is split into tasks of (n, h, j, run of T anchors along w); a
// task gathers its tile into small class-major buffers buf[c * T + i] (so the math loops are
// contiguous and vectorise whatever the layout) and scatters results back with the tensor's
// strides. Anchors are ordered (n,h,w,j) as kdops._layout.anchor_view orders them.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.h"

namespace kdops {

struct View5 {  // a (N,H,W,J,C) strided view
  int64_t N = 0, H = 0, W = 0, J = 0, C = 0, sN = 0, sH = 0, sW = 0, sJ = 0, sC = 0;
  View5() = default;
  explicit View5(const at::Tensor& t)
      : N(t.size(0)), H(t.size(1)), W(t.size(2)), J(t.size(3)), C(t.size(4)), sN(t.stride(0)),
        sH(t.stride(1)), sW(t.stride(2)), sJ(t.stride(3)), sC(t.stride(4)) {}
  // A dense-head tensor itself, without a view op: (A,C) -> (1,1,A,1,C); mmdet's (N,J*C,H,W)
  // -> (N,H,W,J,C).
  static View5 of_head(const at::Tensor& t, int64_t J) {
    View5 v;
    if (t.dim() == 2) {
      v.N = v.H = v.J = 1;
      v.W = t.size(0);
      v.C = t.size(1);
      v.sW = t.stride(0);
      v.sC = t.stride(1);
    } else {
      v.N = t.size(0);
      v.H = t.size(2);
      v.W = t.size(3);
      v.J = J;
      v.C = J > 0 ? t.size(1) / J : 0;
      v.sN = t.stride(0);
      v.sH = t.stride(2);
      v.sW = t.stride(3);
      v.sC = t.stride(1);
      v.sJ = v.C * t.stride(1);
    }
    return v;
  }
  int64_t at(int64_t n, int64_t h, int64_t w, int64_t j) const { return n * sN + h * sH + w * sW + j * sJ; }
  bool hw_mergeable() const { return H <= 1 || sH == W * sW; }
  void merge_hw() {  // (h, w) -> one run of H*W positions: longer tiles on (N,C,H,W) maps
    W *= H;
    H = 1;
    sH = 0;
  }
};

// Merges (h,w) of every view when all allow it, so tiles cover whole rows of H*W anchors.
inline void merge_all(std::initializer_list<View5*> views) {
  for (View5* v : views)
    if (!v->hw_mergeable()) return;
  for (View5* v : views) v->merge_hw();
}

// Task index -> (n, h, j, first w, tile length) for tiles of up to T anchors, `chunks` per row.
struct Tile {
  int64_t n, h, j, w0, len;
};
inline Tile tile_of(const View5& v, int64_t task, int64_t chunks, int64_t T) {
  Tile r;
  const int64_t c = task % chunks, row = task / chunks;
  r.j = row % v.J;
  r.h = (row / v.J) % v.H;
  r.n = row / (v.J * v.H);
  r.w0 = c * T;
  r.len = std::min(T, v.W - r.w0);
  return r;
}
inline int64_t anchor_of(const View5& v, const Tile& t, int64_t i) {
  return ((t.n * v.H + t.h) * v.W + t.w0 + i) * v.J + t.j;
}

// Tile -> class-major buffer buf[c * T + i]; contiguous fast paths for the two layouts that
// matter: anchors contiguous (mmdet's (N,C,H,W)) and classes contiguous ((A,K)).
template <typename scalar_t, typename A>
void gather(const scalar_t* p, const View5& v, const Tile& t, A* buf, int64_t T) {
  const scalar_t* b = p + v.at(t.n, t.h, t.w0, t.j);
  if (v.sW == 1) {
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* src = b + c * v.sC;
      if (c + 1 < v.C) prefetch_row(src + v.sC, t.len);
      A* dst = buf + c * T;
      for (int64_t i = 0; i < t.len; ++i) dst[i] = A(src[i]);
    }
  } else if (v.sC == 1) {
    for (int64_t i = 0; i < t.len; ++i) {
      const scalar_t* src = b + i * v.sW;
      for (int64_t c = 0; c < v.C; ++c) buf[c * T + i] = A(src[c]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t i = 0; i < t.len; ++i) buf[c * T + i] = A(b[c * v.sC + i * v.sW]);
  }
}

// The tile of p = f[i] * buf[c * T + i] (per-anchor factor f).
template <typename scalar_t, typename A>
void scatter(scalar_t* p, const View5& v, const Tile& t, const A* buf, const A* f, int64_t T) {
  scalar_t* b = p + v.at(t.n, t.h, t.w0, t.j);
  if (v.sW == 1) {
    for (int64_t c = 0; c < v.C; ++c) {
      scalar_t* dst = b + c * v.sC;
      const A* src = buf + c * T;
      for (int64_t i = 0; i < t.len; ++i) dst[i] = scalar_t(f[i] * src[i]);
    }
  } else if (v.sC == 1) {
    for (int64_t i = 0; i < t.len; ++i) {
      scalar_t* dst = b + i * v.sW;
      for (int64_t c = 0; c < v.C; ++c) dst[c] = scalar_t(f[i] * buf[c * T + i]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t i = 0; i < t.len; ++i) b[c * v.sC + i * v.sW] = scalar_t(f[i] * buf[c * T + i]);
  }
}

// The tile of p = buf[c * T + i].
template <typename scalar_t, typename A>
void put(scalar_t* p, const View5& v, const Tile& t, const A* buf, int64_t T) {
  scalar_t* b = p + v.at(t.n, t.h, t.w0, t.j);
  if (v.sW == 1) {
    for (int64_t c = 0; c < v.C; ++c) {
      scalar_t* dst = b + c * v.sC;
      const A* src = buf + c * T;
      for (int64_t i = 0; i < t.len; ++i) dst[i] = scalar_t(src[i]);
    }
  } else if (v.sC == 1) {
    for (int64_t i = 0; i < t.len; ++i) {
      scalar_t* dst = b + i * v.sW;
      for (int64_t c = 0; c < v.C; ++c) dst[c] = scalar_t(buf[c * T + i]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c)
      for (int64_t i = 0; i < t.len; ++i) b[c * v.sC + i * v.sW] = scalar_t(buf[c * T + i]);
  }
}

// The rows of a tile read in place (class c at row c * v.sC): float data with anchors
// contiguous. Else nullptr (gather them).
template <typename scalar_t, typename A>
KDOPS_INLINE const A* rows_in_place(const scalar_t* p, const View5& v, const Tile& t) {
  if constexpr (std::is_same<scalar_t, A>::value) {
    if (v.sW == 1) return p + v.at(t.n, t.h, t.w0, t.j);
  }
  return nullptr;
}

}  // namespace kdops
