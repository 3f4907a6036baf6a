// 2^x for the salience kernels (salience.cu, salience_wgmma.cu): MUFU's ex2.approx, or a polynomial on the FMA
// pipe (FlashAttention-4's trick) for a share of the elements, so both units work when MUFU is the bound.
//
// The polynomial: x clamped to [-127, 127], j = floor(x) by one round-down add of 1.5 * 2^23, f = x - j in [0, 1],
// 2^f ~ 1 + f (c1 + f (c2 + f c3)) (minimax relative error 8.6e-5 on [0, 1], p(0) = 1 exactly, p(1) < 2), and j
// added to the exponent bits as an integer. x = -127 (also -inf, NaN) gives exactly +0; the result never wraps
// (tests/test_cuda_salience.py mirrors it in numpy).
#pragma once

#include <stdint.h>

namespace sparsevila {

// 2^f on [0, 1]: 1 + f (c1 + f (c2 + f c3)), minimax in relative error with c0 = 1 (kept in sync with the
// numpy mirror of tests/test_cuda_salience.py, which parses these three lines).
constexpr float kExp2C1 = 0.6951173f;
constexpr float kExp2C2 = 0.22764353f;
constexpr float kExp2C3 = 0.07706803f;

// MUFU: 2^x, flushing denormal results to 0; ex2(-inf) = +0.
__device__ __forceinline__ float ex2_mufu(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// FMA pipe: 2^x by the polynomial (file comment). floor(x) is read from the low mantissa bits of
// t = 1.5 * 2^23 + x rounded toward -inf (t in [2^23, 2^24): integer steps); t's bits << 23 is j << 23 modulo
// 2^32 (the constant's bits shift out), so the exponent field becomes 127 + j in [0, 254] (p in [1, 2)).
__device__ __forceinline__ float ex2_poly(float x) {
  x = fminf(fmaxf(x, -127.f), 127.f);
  const float t = __fadd_rd(x, 12582912.f);
  const float f = x - (t - 12582912.f);
  const float p = fmaf(fmaf(fmaf(kExp2C3, f, kExp2C2), f, kExp2C1), f, 1.f);
  return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
}

// 2^x of column pair ``pair`` of a thread's scores: the polynomial for every kPolyEvery-th pair, else MUFU.
template <int kPolyEvery>
__device__ __forceinline__ float ex2_pair(float x, int pair) {
  if constexpr (kPolyEvery > 0) {
    if (pair % kPolyEvery == kPolyEvery - 1) return ex2_poly(x);  // pair is a compile-time constant once unrolled
  }
  return ex2_mufu(x);
}

}  // namespace sparsevila
