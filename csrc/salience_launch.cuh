// Host-side launch code shared by the two salience kernel files (salience.cu, salience_wgmma.cu): the runtime
// (dtype, head dim, poly_every) -> template arguments dispatch, and the launches (salience.cu: a (blocks x segments,
// heads) grid; salience_wgmma.cu: a persistent grid) with the kernel's dynamic shared memory set once per device.
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
  constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(dtype, kInvalid, [&](auto t) {
    return dispatch_int<64, 72, 80, 128>(head_dim, kInvalid, [&](auto d) {
      return dispatch_int<0, 2, 4, 8>(poly_every, kInvalid, [&](auto p) { return fn(t, d, p); });
    });
  });
}

// The kernel's dynamic shared-memory limit raised to smem, once per device (``configured``: one per kernel
// instantiation).
template <typename Args>
cudaError_t configure_smem(void (*kernel)(Args), std::atomic<uint64_t>& configured, int smem) {
  return once_per_device(configured, [&] {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  });
}

// kernel<<<(nblk * num_segments, heads), threads, smem>>>(args) after configure_smem; cudaErrorInvalidValue for a
// grid out of range.
template <typename Args>
cudaError_t launch_segments(void (*kernel)(Args), std::atomic<uint64_t>& configured, int smem, int threads,
                            const Args& args, int nblk, int num_segments, int heads, cudaStream_t stream) {
  const cudaError_t e = configure_smem(kernel, configured, smem);
  if (e != cudaSuccess) return e;
  const int64_t gx = static_cast<int64_t>(nblk) * num_segments;
  if (gx <= 0 || gx > 0x7fffffff || heads <= 0 || heads > 65535) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(gx), heads, 1), threads, smem, stream>>>(args);
  return cudaGetLastError();
}

// kernel<<<min(items, SMs), threads, smem>>>(args) after configure_smem: a persistent grid for a kernel of one CTA
// per SM whose CTAs take the work items blockIdx.x, blockIdx.x + gridDim.x, ... (items >= 1).
template <typename Args>
cudaError_t launch_persistent(void (*kernel)(Args), std::atomic<uint64_t>& configured, int smem, int threads,
                              const Args& args, int64_t items, cudaStream_t stream) {
  cudaError_t e = configure_smem(kernel, configured, smem);
  int dev = 0, sms = 0;
  if (e == cudaSuccess) e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  if (items <= 0) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(items < sms ? items : sms), threads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace sparsevila
