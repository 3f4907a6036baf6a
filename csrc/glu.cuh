// The gated-MLP epilogue of the decode GEMVs (gemv.cu, gemv4.cu): silu(gate) * up rounded to the output dtype T
// at each step as the unfused path stores it (F.linear's outputs, F.silu's, the product):
//     glu(g, u) = round(round(silu(round(g))) * round(u)),  silu(v) = v / (1 + e^-v)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparsevila {

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
__device__ __forceinline__ float glu(float gate, float up) {
  const float g = round_to<T>(gate);
  return round_to<T>(round_to<T>(__fdividef(g, 1.f + __expf(-g))) * round_to<T>(up));
}

}  // namespace sparsevila
