// Helpers shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef KDOPS_INLINE
#define KDOPS_INLINE inline __attribute__((always_inline))
#endif

namespace kdops {

// float for half/bfloat16/float, double for double: every kernel accumulates in it.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// An empty placeholder for a gradient that was not asked for.
inline at::Tensor no_grad_placeholder(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// Rows of a (N,C,H,W) map start a new page each, where hardware prefetchers stop: ask for
// the next row while this one is processed.
template <typename T>
KDOPS_INLINE void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * int64_t(sizeof(T)); o += 64) __builtin_prefetch(c + o);
}

// Fetches rows [r0, r1) of n values (es bytes each, stride sz values) into L2.
KDOPS_INLINE void prefetch_rows_l2(const char* p, int64_t sz, int64_t es, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t o = 0; o < n * es; o += 64) __builtin_prefetch(p + r * sz * es + o, 0, 2);
}

// Sums per-task partials in a fixed order, so results do not depend on thread count.
inline double ordered_sum(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

}  // namespace kdops

namespace kdops {

// The instruction sets of multi_isa.h: GCC on x86-64 compiles a kernel for each; elsewhere
// there is one version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KDOPS_MULTI_ISA 1
#else
#define KDOPS_MULTI_ISA 0
#endif
enum class Isa { base, avx2, avx512 };

// The widest of them this CPU runs (checked once).
inline Isa cpu_isa() {
#if KDOPS_MULTI_ISA
  static const Isa isa = __builtin_cpu_supports("avx512f") ? Isa::avx512
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::avx2
                                                                                               : Isa::base;
  return isa;
#else
  return Isa::base;
#endif
}

template <typename F>
inline F isa_pick(F base, F avx2, F avx512) {
  switch (cpu_isa()) {
    case Isa::avx512:
      return avx512;
    case Isa::avx2:
      return avx2;
    default:
      return base;
  }
}

// The version of a kernel function (multi_isa.h) for this CPU, e.g.
// KDOPS_ISA_PICK(masked_mse_planes<scalar_t, true>)(args...).
#define KDOPS_ISA_PICK(...) \
  ::kdops::isa_pick(&::kdops::base::__VA_ARGS__, &::kdops::avx2::__VA_ARGS__, &::kdops::avx512::__VA_ARGS__)

// Elements per inner block: low-precision inputs are widened into float buffers of this
// size so that the arithmetic loops run on plain float arrays and vectorise.
constexpr int64_t kVecBlock = 512;

// Returns a pointer to n values of p as acc_t: p itself when no conversion is needed.
template <typename scalar_t>
inline const acc_t<scalar_t>* widen(const scalar_t* p, int64_t n, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t<scalar_t>>(p[i]);
    return buf;
  }
}

// Where n acc_t values destined for p are computed: p itself, or buf (then call narrow()).
template <typename scalar_t>
inline acc_t<scalar_t>* out_buffer(scalar_t* p, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return p;
  } else {
    return buf;
  }
}

template <typename scalar_t>
inline void narrow(const acc_t<scalar_t>* buf, int64_t n, scalar_t* p) {
  if constexpr (!std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }
}

// Runs tasks 0..total-1 on the calling thread and on up to at::get_num_threads() - 1 helpers
// from ATen's inter-op pool; workers take task indices from a shared counter until none is
// left, and the caller returns once every task is done. The caller waits only for tasks a helper
// has claimed, never for a helper to start: on a machine shared with other processes a
// descheduled helper costs nothing, where a fork-join region (at::parallel_for) waits for it
// at its barrier for a whole scheduler time slice. Results never depend on who ran a task.
class TaskPool {
 public:
  explicit TaskPool(int64_t total) : st_(std::make_shared<State>()) { st_->total = total; }
  // make() -> per-thread state; task(state, t) for every t in [0, total).
  template <typename Make, typename Task>
  void run(const Make& make, const Task& task) {
    State& st = *st_;
    std::function<void()> body = [&]() {
      auto local = make();
      for (int64_t t; (t = st.next.fetch_add(1)) < st.total;) {
        try {
          task(local, t);
        } catch (...) {
          std::lock_guard<std::mutex> g(st.mu);
          if (!st.error) st.error = std::current_exception();
        }
        st.done.fetch_add(1);
      }
    };
    const int64_t helpers = std::min<int64_t>(at::get_num_threads(), st.total) - 1;
    for (int64_t h = 0; h < helpers; ++h) {
      at::launch([keep = st_, b = &body]() {
        // `body` lives on the caller's stack: a helper registers as active before it looks
        // for work, and the caller waits for active helpers, so a late one finds the counter
        // spent and leaves without touching it.
        keep->active.fetch_add(1);
        if (keep->next.load() < keep->total) (*b)();
        keep->active.fetch_sub(1);
      });
    }
    body();
    while (st.done.load() < st.total || st.active.load() > 0) std::this_thread::yield();
    if (st.error) std::rethrow_exception(st.error);
  }

 private:
  struct State {
    std::atomic<int64_t> next{0}, done{0}, active{0};
    int64_t total = 0;
    std::exception_ptr error;
    std::mutex mu;
  };
  std::shared_ptr<State> st_;
};

}  // namespace kdops
