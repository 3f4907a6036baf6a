// Warp-level tensor-core helpers shared by the kernels: ldmatrix and mma.sync m16n8k16 (fp32 accumulate),
// with the PTX fragment layouts of the ISA (A row-major 16x16, B col-major 16x8, C 16x8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace sparsevila {

// Four 8x8 b16 matrices from shared memory (lane l addresses row l % 8 of matrix l / 8).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16) * b (16x8) for T = __nv_bfloat16 or __half (TY: its PTX type); pack(x, y) makes one b16x2
// register.
#define SVO_MMA_16816(TY)                                                                                \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
      "{%0, %1, %2, %3};"                                                                                \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct Mma {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16");
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value) {
      SVO_MMA_16816("f16");
    } else {
      SVO_MMA_16816("bf16");
    }
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    if constexpr (std::is_same<T, __half>::value) {
      __half2 h = __floats2half2_rn(x, y);
      return *reinterpret_cast<uint32_t*>(&h);
    } else {
      __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
      return *reinterpret_cast<uint32_t*>(&h);
    }
  }
};
#undef SVO_MMA_16816

}  // namespace sparsevila
