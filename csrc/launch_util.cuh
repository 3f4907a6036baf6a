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
#include <utility>

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

// kernel<<<grid, block, smem, stream>>>(args...), allowed to start early under programmatic dependent launch when
// pdl != 0 (the kernel then waits in griddepcontrol.wait before reading what earlier kernels write).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, int smem, cudaStream_t stream, int pdl,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
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
