// gemv, cuda backend (sm_80+): y[M, N] = x[M, K] @ W^T (+ bias) for 1 <= M <= 8 rows (the decode batch), one launch
// (no split-K reduce grid), W bf16/fp16.
//   plain: out = y, W [N, K]
//   glu:   out[:, n] = round(round(silu(round(y[:, n]))) * round(y[:, N + n])), W [2N, K] (a gated MLP's fused gate
//          and up projections; bias [2N]): the gate/up GEMV emits silu(gate) * up itself, rounded to x's dtype at
//          each step as the unfused path (F.linear, F.silu, *) stores it, so the down projection reads h directly.
//
// At M <= 8 a GEMV streams W once, 2 bytes per multiply-add per row of x: plain fp32 FMAs keep up with copy
// bandwidth at batch 1 (per 16-byte chunk of W and row of x: one load, 8 conversions, 8 FMAs), no tensor cores.
// CTA: warps = RW row groups x KW K slices; warp (wr, wk) owns R consecutive output rows (glu: their gate and up
// rows of W, 2R rows) and the 256-element chunks wk, wk + KW, wk + 2 KW, ... of K: lane l reads
// k = 256 c + 8 l .. + 8 of each row (16 bytes; a warp's load is 512 contiguous bytes). Each lane keeps U = 8 / rows
// chunks per row in flight (8 x 16 B), double-buffered in registers: the next U chunks are requested before the
// current ones are multiplied. x (tiny, shared by every CTA) is read through L1. Under programmatic dependent launch
// the first U chunks of W are requested before griddepcontrol.wait (W never depends on the previous kernel; x and
// out may). Sums: two fp32 chains per (row of x, row of W) at M = 1, one otherwise; a warp's lanes meet by
// shuffles, the KW slices of a row in shared memory, summed in K-slice order (deterministic), + bias, cast to x's
// dtype (glu: then the epilogue above).
//
// Folds (M = 1 only, the decode batch the integration runs gemv at; template flags, so the plain kernels are
// unchanged):
//   norm:     y = W (x * g) / sqrt(mean(x^2) + eps) (an RMSNorm with weight g folded into the projection): after
//             the dependency wait each CTA stages x * g in shared memory (fp32, K <= kMaxNormK) and sums x^2 (per
//             thread, then per warp, then the warps in order: deterministic, equal in every CTA); the loop reads
//             its x chunks from there (no g loads beside the weight stream, the plain kernel's registers), and the
//             summed dot is scaled by the reciprocal RMS before bias and glu. The first weight chunks are in flight
//             during the staging.
//   residual: out = round(r + round(y')) with y' the output above (a residual add after the projection, as
//             ``residual + linear(h)`` stores it); r [1, N] contiguous, read in the epilogue only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "glu.cuh"
#include "launch_util.cuh"
#include "sparsevila_cuda.h"

namespace {

constexpr int kMaxRows = 8;   // rows of x per launch
constexpr int kMaxWarps = 8;  // per CTA
constexpr int kMaxNormK = 12288;  // norm fold: x * g staged as K floats in (dynamic, <= 48 KB) shared memory

struct Args {
  const void* x;
  const void* w;
  const void* bias;  // null: none
  void* out;
  int M, N, K;
  long long sx, sw;  // row strides of x and W (elements)
  const void* norm;      // the folded RMSNorm's weight g [K] (norm fold only)
  const void* residual;  // r [1, N] (residual fold only)
  float eps;             // the folded RMSNorm's epsilon
};

enum Fold { kPlain = 0, kNorm = 1, kResidual = 2 };  // bit flags: kNorm | kResidual folds both

// 16 bytes of W, streamed once: not kept in L1. Volatile, so the prologue's loads stay before griddepcontrol.wait.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 8 packed values -> fp32 (bf16: the bits shifted into an fp32's high half, exact).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, __half>::value) {
      const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&u[i]));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    } else {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
    }
  }
}

// x's row m, 8 k's from k0, in fp32.
template <typename T>
__device__ __forceinline__ void load_x(const Args& a, int m, int k0, float (&h)[8]) {
  unpack8<T>(*reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + m * a.sx + k0), h);
}

template <typename T, int R, int MT, bool GLU, int FOLD>
__global__ void __launch_bounds__(256) gemv_kernel(const __grid_constant__ Args a, int kwarps, int pdl) {
  constexpr int RW = GLU ? 2 * R : R;  // rows of W per warp (glu: gate rows, then the up rows N further)
  constexpr int U = RW >= 8 ? 1 : 8 / RW;  // chunks per row in flight per lane
  constexpr int A = MT == 1 ? 2 : 1;   // independent FMA chains per (x row, W row)
  constexpr bool NORM = FOLD & kNorm;
  static_assert(FOLD == kPlain || MT == 1, "folds are compiled for one row of x");
  __shared__ float red[kMaxWarps][MT][RW];
  __shared__ float red_sq[NORM ? kMaxWarps : 1];  // norm: the warps' sums of x^2
  extern __shared__ float4 xg[];                  // norm: x * g, K floats
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int wn = warp / kwarps, wk = warp % kwarps;
  const int n0 = (blockIdx.x * (W / kwarps) + wn) * R;
  const int chunks = a.K >> 3, stride = 32 * kwarps, step = stride * U;
  const bool active = n0 < a.N;
  const T* wrow[RW];
#pragma unroll
  for (int r = 0; r < RW; ++r) {  // rows past N read row N - 1 (of their half) and are never stored
    const int n = (n0 + r % R < a.N ? n0 + r % R : a.N - 1) + (r < R ? 0 : a.N);
    wrow[r] = static_cast<const T*>(a.w) + (long long)n * a.sw + 8 * lane;
  }

  uint4 buf[2][RW][U];
  auto request = [&](uint4 (&b)[RW][U], int base) {  // chunks base + u * stride (+ lane) of the RW rows
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < RW; ++r)
        b[r][u] = base + u * stride + lane < chunks ? load_stream(wrow[r] + 8 * (base + u * stride))
                                                    : make_uint4(0u, 0u, 0u, 0u);
  };
  float acc[MT][RW][A] = {};
  auto multiply = [&](const uint4 (&b)[RW][U], int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * stride + lane;
      if (c >= chunks) continue;
      float wf[RW][8];
#pragma unroll
      for (int r = 0; r < RW; ++r) unpack8<T>(b[r][u], wf[r]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.M) break;
        float h[8];
        if constexpr (NORM) {  // x * g, staged
          const float4 lo = xg[2 * c], hi = xg[2 * c + 1];
          h[0] = lo.x, h[1] = lo.y, h[2] = lo.z, h[3] = lo.w, h[4] = hi.x, h[5] = hi.y, h[6] = hi.z, h[7] = hi.w;
        } else {
          load_x<T>(a, m, 8 * c, h);
        }
#pragma unroll
        for (int r = 0; r < RW; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][r][e % A] = fmaf(wf[r][e], h[e], acc[m][r][e % A]);
      }
    }
  };

  int base = 32 * wk;
  if (active) request(buf[0], base);
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  float rinv = 1.f;  // norm: 1 / sqrt(mean(x^2) + eps)
  if constexpr (NORM) {
    float sq = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      float h[8], g[8];
      load_x<T>(a, 0, 8 * c, h);
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(a.norm) + 8 * c)), g);
#pragma unroll
      for (int e = 0; e < 8; ++e) sq = fmaf(h[e], h[e], sq);
      xg[2 * c] = make_float4(h[0] * g[0], h[1] * g[1], h[2] * g[2], h[3] * g[3]);
      xg[2 * c + 1] = make_float4(h[4] * g[4], h[5] * g[5], h[6] * g[6], h[7] * g[7]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
    if (lane == 0) red_sq[warp] = sq;
    __syncthreads();
    float ss = 0.f;
    for (int w = 0; w < W; ++w) ss += red_sq[w];  // warps in order
    rinv = rsqrtf(ss / static_cast<float>(a.K) + a.eps);
  }
  // two buffers, unrolled by hand so no registers are copied between iterations
  while (active && base < chunks) {
    if (base + step < chunks) request(buf[1], base + step);
    multiply(buf[0], base);
    base += step;
    if (base >= chunks) break;
    if (base + step < chunks) request(buf[0], base + step);
    multiply(buf[1], base);
    base += step;
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      float v = acc[m][r][0];
#pragma unroll
      for (int i = 1; i < A; ++i) v += acc[m][r][i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
      if (lane == 0) red[warp][m][r] = v;
    }
  __syncthreads();
  const int rows = R * (W / kwarps);
  const T* bias = static_cast<const T*>(a.bias);
  for (int idx = threadIdx.x; idx < a.M * rows; idx += blockDim.x) {
    const int m = idx / rows, c = idx % rows, n = blockIdx.x * rows + c;
    if (n >= a.N) continue;
    const float* part = &red[(c / R) * kwarps][m][c % R];  // + s * MT * RW: K slice s of this row
    float y = 0.f;
    for (int s = 0; s < kwarps; ++s) y += part[s * MT * RW];  // K slices in order
    if constexpr (NORM) y *= rinv;
    if (bias != nullptr) y += static_cast<float>(bias[n]);
    if constexpr (GLU) {
      float up = 0.f;
      for (int s = 0; s < kwarps; ++s) up += part[s * MT * RW + R];
      if constexpr (NORM) up *= rinv;
      if (bias != nullptr) up += static_cast<float>(bias[a.N + n]);
      y = sparsevila::glu<T>(y, up);
    }
    if constexpr ((FOLD & kResidual) != 0)
      y = static_cast<float>(static_cast<const T*>(a.residual)[n]) + static_cast<float>(static_cast<T>(y));
    static_cast<T*>(a.out)[(long long)m * a.N + n] = static_cast<T>(y);
  }
}

// fn(Tag<T>, Int<R>, Int<MT>, Int<GLU>, Int<FOLD>) for the compiled instantiation (folds: M = 1 only);
// `fallback` when there is none.
template <typename Fn>
int dispatch(int dtype, int rows, int m, int glu, int fold, int fallback, Fn&& fn) {
  using sparsevila::dispatch_int;
  return sparsevila::dispatch_dtype(dtype, fallback, [&](auto t) {
    return dispatch_int<1, 2, 4>(rows, fallback, [&](auto r) {
      return dispatch_int<1, 2, 4, 8>(m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8, fallback, [&](auto mt) {
        constexpr bool one_row = decltype(mt)::value == 1;
        return dispatch_int<0, 1>(glu, fallback, [&](auto g) {
          return dispatch_int<kPlain, kNorm, kResidual, kNorm | kResidual>(fold, fallback, [&](auto f) -> int {
            if constexpr (decltype(f)::value != kPlain && !one_row) return fallback;
            else return fn(t, r, mt, g, f);
          });
        });
      });
    });
  });
}

}  // namespace

extern "C" {

int svo_gemv(int dtype, const void* x, const void* w, const void* bias, void* out, int M, int N, int K,
             long long sx, long long sw, int glu, const void* norm, float eps, const void* residual, int rows,
             int warps, int kwarps, int pdl, void* stream) {
  const int fold = (norm != nullptr ? kNorm : 0) | (residual != nullptr ? kResidual : 0);
  if (M < 1 || M > kMaxRows || N < 1 || K < 8 || K % 8 || sw < K || sw % 8 || (M > 1 && (sx < K || sx % 8)) ||
      warps < 1 || warps > kMaxWarps || kwarps < 1 || warps % kwarps || (fold != kPlain && M != 1) || !(eps >= 0.f) ||
      (norm != nullptr && K > kMaxNormK))
    return cudaErrorInvalidValue;
  const Args a{x, w, bias, out, M, N, K, sx, sw, norm, residual, eps};
  return dispatch(dtype, rows, M, glu, fold, cudaErrorInvalidValue, [&](auto t, auto r, auto mt, auto g,
                                                                        auto f) -> int {
    using T = typename decltype(t)::type;
    constexpr int R = decltype(r)::value;
    const int per_cta = R * (warps / kwarps);
    return sparsevila::launch_pdl(gemv_kernel<T, R, decltype(mt)::value, decltype(g)::value == 1,
                                              decltype(f)::value>,
                                  dim3((N + per_cta - 1) / per_cta), dim3(32 * warps),
                                  (decltype(f)::value & kNorm) != 0 ? K * static_cast<int>(sizeof(float)) : 0,
                                  static_cast<cudaStream_t>(stream), pdl, a, kwarps, pdl);
  });
}

}  // extern "C"
