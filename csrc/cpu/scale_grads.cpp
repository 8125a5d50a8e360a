// CPU kernel of kdops::scale_grads_: grads[i] *= factors[i] in place. Loss ops whose gradient is
// computed in the forward pass (bckd_cls_loss, bckd_loc_loss) scale it with the incoming
// gradient in backward.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

#define KDOPS_KERNEL "scale_grads_kernel.h"
#include "multi_isa.h"

namespace kdops {
namespace {

template <typename scalar_t>
void scale_span(scalar_t* p, int64_t n, acc_t<scalar_t> f) {
  if constexpr (std::is_same<scalar_t, acc_t<scalar_t>>::value) {
    KDOPS_ISA_PICK(scale_block<scalar_t>)(p, n, f);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = scalar_t(acc_t<scalar_t>(p[i]) * f);
  }
}

// Every tensor in one pool of 64K-element tasks (see TaskPool: no fork-join barrier, so a
// backward pass on a busy machine does not wait for a descheduled thread). Dense tensors are
// scaled through their storage span whatever their strides.
void scale_grads_cpu(at::TensorList grads, at::ArrayRef<double> factors) {
  TORCH_CHECK(grads.size() == factors.size(), "kdops::scale_grads_: one factor per tensor expected");
  constexpr int64_t kChunk = 1 << 16;
  std::vector<int64_t> tensor, start;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (factors[i] == 1.0 || g.numel() == 0) continue;
    if (!g.is_non_overlapping_and_dense()) {
      g.mul_(factors[i]);
      continue;
    }
    for (int64_t o = 0; o < g.numel(); o += kChunk) {
      tensor.push_back((int64_t)i);
      start.push_back(o);
    }
  }
  TaskPool((int64_t)tensor.size()).run([] { return 0; }, [&](int, int64_t t) {
    const at::Tensor& g = grads[tensor[t]];
    const int64_t o = start[t], n = std::min(kChunk, g.numel() - o);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scale_grads_", [&] {
      scale_span(g.data_ptr<scalar_t>() + o, n, acc_t<scalar_t>(factors[tensor[t]]));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) { m.impl("scale_grads_", &scale_grads_cpu); }

}  // namespace kdops
