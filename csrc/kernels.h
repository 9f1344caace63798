// Shared by lnjax's native CPU kernels: storage types and their conversions, the accumulator
// type, deterministic lane sums, the intra-op thread pool loop and dtype dispatch.
#ifndef LNJAX_KERNELS_H_
#define LNJAX_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace lnjax {

namespace ffi = xla::ffi;

// --- storage types and conversions ---------------------------------------------------------

struct bf16 {
  uint16_t bits;
};

inline float to_float(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <class T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline Acc<T> load(T v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_float(v);
  } else {
    return static_cast<Acc<T>>(v);
  }
}

template <class T>
inline T store(Acc<T> v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(v);
  } else {
    return static_cast<T>(v);
  }
}

// --- threads ------------------------------------------------------------------------------

// Runs f(c) for c in [0, n) on the calling thread and XLA's intra-op pool. Chunks are claimed
// dynamically; the caller waits only for chunks already claimed, so a pool without free
// threads cannot deadlock, and a task that starts after all chunks are gone touches nothing
// but the shared state it keeps alive.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F&& f) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t c = 0; c < n; ++c) f(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &f] {
    for (int64_t c; (c = state->next.fetch_add(1)) < n;) {
      f(c);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}


constexpr int kLanes = 16;

template <class A>
inline A tree(A* acc) {  // lanes combined in a fixed order
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

template <class T>
T* data(ffi::AnyBuffer& b) {
  return static_cast<T*>(b.untyped_data());
}
template <class T>
T* data(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

// Calls f with a value of the storage type of `dtype`.
template <class F>
ffi::Error dispatch(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32: return f(float{});
    case ffi::DataType::F64: return f(double{});
    case ffi::DataType::BF16: return f(bf16{});
    case ffi::DataType::F16: return f(_Float16{});
    default: return ffi::Error::InvalidArgument("x must be float32, float64, bfloat16 or float16");
  }
}

}  // namespace lnjax

#endif  // LNJAX_KERNELS_H_
