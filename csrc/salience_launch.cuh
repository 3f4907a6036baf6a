// Host-side launch code shared by the two salience kernel files (salience.cu, salience_wgmma.cu): the runtime
// (dtype, head dim, poly_every) -> template arguments dispatch, and the launch over a (blocks x segments, heads)
// grid with the kernel's dynamic shared memory set once per device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "launch_util.cuh"

namespace sparsevila {

// Calls fn(Tag<T>, Int<D>, Int<kPolyEvery>) for the compiled instantiation (bf16/fp16, D 64/72/80/128,
// poly_every 0/2/4/8); cudaErrorInvalidValue if none.
template <typename Fn>
int dispatch_salience(int dtype, int head_dim, int poly_every, Fn&& fn) {
  auto by_poly = [&](auto t, auto d) -> int {
    switch (poly_every) {
      case 0: return fn(t, d, Int<0>{});
      case 2: return fn(t, d, Int<2>{});
      case 4: return fn(t, d, Int<4>{});
      case 8: return fn(t, d, Int<8>{});
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  };
  auto by_d = [&](auto t) -> int {
    switch (head_dim) {
      case 64: return by_poly(t, Int<64>{});
      case 72: return by_poly(t, Int<72>{});
      case 80: return by_poly(t, Int<80>{});
      case 128: return by_poly(t, Int<128>{});
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  };
  if (dtype == 0) return by_d(Tag<__nv_bfloat16>{});
  if (dtype == 1) return by_d(Tag<__half>{});
  return static_cast<int>(cudaErrorInvalidValue);
}

// kernel<<<(nblk * num_segments, heads), threads, smem>>>(args) after raising the kernel's dynamic shared-memory
// limit to smem (once per device: ``configured``, one per kernel instantiation); cudaErrorInvalidValue for a grid
// out of range.
template <typename Args>
cudaError_t launch_segments(void (*kernel)(Args), std::atomic<uint64_t>& configured, int smem, int threads,
                            const Args& args, int nblk, int num_segments, int heads, cudaStream_t stream) {
  const cudaError_t e = once_per_device(configured, [&] {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  });
  if (e != cudaSuccess) return e;
  const int64_t gx = static_cast<int64_t>(nblk) * num_segments;
  if (gx <= 0 || gx > 0x7fffffff || heads <= 0 || heads > 65535) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(gx), heads, 1), threads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace sparsevila
