// Host-side launch helpers shared by the kernels: compile-time dispatch tags, and kernel attributes (the
// dynamic shared-memory opt-in, non-portable cluster sizes), which belong to a kernel on one device: set once per
// (kernel, device) pair, from any thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

namespace sparsevila {

// Runtime (dtype, head dim, ...) -> template arguments: dispatchers call fn(Tag<T>{}, Int<D>{}, ...).
template <typename T>
struct Tag {
  using type = T;
};
template <int V>
using Int = std::integral_constant<int, V>;

// fn(Int<V>{}) for the V of Vs equal to v; `fallback` when there is none.
template <int... Vs, typename Fn>
int dispatch_int(int v, int fallback, Fn&& fn) {
  int rc = fallback;
  (void)((v == Vs ? (rc = fn(Int<Vs>{}), true) : false) || ...);
  return rc;
}

// fn(Tag<__nv_bfloat16>{}) for dtype 0, fn(Tag<__half>{}) for 1; `fallback` otherwise.
template <typename Fn>
int dispatch_dtype(int dtype, int fallback, Fn&& fn) {
  if (dtype == 0) return fn(Tag<__nv_bfloat16>{});
  if (dtype == 1) return fn(Tag<__half>{});
  return fallback;
}

// Runs ``configure()`` unless ``done`` records the current device (a bit per device index < 64; others always
// configure). Two threads racing both configure, which is harmless.
template <typename F>
cudaError_t once_per_device(std::atomic<uint64_t>& done, F&& configure) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  e = configure();
  if (e == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return e;
}

}  // namespace sparsevila
