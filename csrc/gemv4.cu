// w4a16_linear, cuda backend (sm_80+): y[M, :] = x[M, K] @ W^T (+ bias) for M <= 16 with 4-bit weights, in one
// launch (no split-K reduce grid).
//   plain: out = y, W [N, K]
//   glu:   out[:, n] = glu(y[:, n], y[:, N + n]) (glu.cuh: silu(gate) * up, rounded as the unfused path), W [2N, K]
//          (a gated MLP's fused gate and up projections; bias [2N]): a warp's tiles are the gate rows of its output
//          rows and the up rows N further, so both halves meet in the CTA's reduction.
//
// Weight format (sparsevila_ops.quant.W4Weight): W[n, k] = (q[n, k] - z[k / G, n]) s[k / G, n], q in [0, 15];
// qweight int32 [N, K / 8]: in each block of 128 along K, word i (0..15) holds q[n, 128 b + 16 j + i] in bits
// [4 j, 4 j + 4). scales [K / G, N] in x's dtype, zeros uint8 [K / G, N], G a multiple of 128.
//
// Tensor cores with the weights as the MMA's B operand (n = 8 output rows of W per tile) and x as A (m = 16 rows: the
// batch; rows past M hold row 0's values or zeros, their outputs never stored): out^T tile = W tile x^T. Each lane (g =
// lane / 4, t = lane % 4) reads the 16 contiguous bytes of words 4t..4t+3 of row g of a tile per block (one 128-bit
// load). Since the order of k inside a dot does not matter, the MMA's k slots are permuted to match what the lane
// holds: for slice j (k in [16 j, 16 j + 16)), slots (2t, 2t+1) take k = 16 j + 4t + (0, 1) (words 4t, 4t+1, nibble j)
// and slots (2t+8, 2t+9) take k = 16 j + 4t + (2, 3) (words 4t+2, 4t+3); x's A fragment is loaded with the same
// permutation (8 contiguous bytes of x per lane and slice). A nibble pair becomes a b16x2 operand with one byte permute
// per word pair and one and-or per slice:  bits(MAGIC | q) = MAGIC + q  exactly (bf16 MAGIC 128: 0x4300; fp16 1024:
// 0x6400), so
//     a[m, n] = sum_k x[m, k] (MAGIC + q[n, k])                    (fp32 accumulate, exact products)
//     xs[m]   = sum_k x[m, k]                                      (one more MMA per slice, B = ones)
//     acc[m, n] += s[n] (a[m, n] - (MAGIC + z[n]) xs[m])  =  sum_k x[m, k] (q - z) s     per 128-block
// No float op per weight: the dequantization is the MMA's. The cancellation costs ~MAGIC / |q - z| roundings of a
// plain fp32 dot (~1e-5 relative), far below the output's.
//
// Grid: ceil(N / (8 RO W / WK)) CTAs of W warps in W / WK row groups x WK K ranges: warp (wn, wk) owns RO = R
// (glu: R / 2) tiles of 8 output rows (N a multiple of 8, so a tile is all in or all out), R tiles of W rows (the R
// tiles share each x fragment), and the wk-th of WK contiguous ranges of the K / 128 blocks.
// Each warp streams its blocks' weights, scales, zeros and x rows through its own S-stage cp.async ring in shared
// memory (S - 1 blocks in flight, no register cost while in flight, no block-wide barrier). The partials meet in
// shared memory (the rings, drained) and each row group's WK are summed in K order (deterministic), + bias, cast
// to x's dtype. Under programmatic dependent launch the first S - 1 blocks' weights are requested before
// griddepcontrol.wait (they never depend on the previous kernel); x is read and out written after it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

#include "cp_async.cuh"
#include "glu.cuh"
#include "launch_util.cuh"
#include "mbarrier.cuh"
#include "mma_sync.cuh"
#include "sparsevila_cuda.h"

namespace {

using sparsevila::Int;
using sparsevila::Mma;

constexpr int kPackK = 128;  // K elements per packing block (16 int32 words)

struct Args {
  const void* x;
  const int* qweight;
  const void* scales;
  const uint8_t* zeros;
  const void* bias;  // null: none
  void* out;
  int M, N, K, blocks_per_group;  // N: outputs per row of x (glu: half of W's rows)
  long long sx;  // x's row stride (elements)
};

template <typename T>
struct Magic;
template <>
struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kBits2 = 0x43004300u;  // 128.0 in both halves
  static constexpr uint32_t kOne2 = 0x3F803F80u;  // 1.0 in both halves
};
template <>
struct Magic<__half> {
  static constexpr uint32_t kBits2 = 0x64006400u;  // 1024.0
  static constexpr uint32_t kOne2 = 0x3C003C00u;
};

constexpr int kXPitch = 288;  // bytes per x row in a stage: 256 + 32, so a half-warp's 8-byte fragment reads hit
                              // distinct banks (row g starts 8 g words apart modulo 32)

// One warp's ring, S stages: weights [S][R][32 lanes] x 16 B, x [S][M] x kXPitch (256 B used), scales [S][R] x 16 B
// (8 values), zeros [S][R] x 8 B.
template <int R, int S>
struct Ring {
  int x, scales, zeros, bytes;  // offsets and size (x's rows: M, known at launch)
  __host__ __device__ explicit Ring(int M)
      : x(S * R * 512), scales(x + S * M * kXPitch), zeros(scales + S * R * 16),
        bytes((zeros + S * R * 8 + 15) / 16 * 16) {}
};

// The first W row of tile r of a warp whose output rows start at n0: tiles past the output tiles RO are the up rows.
template <int R, bool GLU>
__device__ __forceinline__ int tile_row(int n0, int r, int N) {
  constexpr int RO = GLU ? R / 2 : R;
  return n0 + 8 * (r % RO) + (r < RO ? 0 : N);
}

// One warp's streams, addresses fixed at the start. Per block blk: each lane copies 16 B of tile r at
// w[r] + 16 blk (words); lanes 0..R-1 tile `lane`'s 8 scales, lanes 16..16+R-1 tile `lane - 16`'s 8 zeros (aux),
// of group blk / blocks_per_group; and x's M rows, 16 chunks of 16 B each, chunk q = lane + 32 i is row q / 16,
// elements 128 blk + 8 (q % 16) .. + 8.
template <typename T, int R, int S, bool GLU>
struct Stream {
  Ring<R, S> ring_layout;
  const int* w[R];  // tile r's row g, word 4t (tiles past N: tile 0's, never read)
  int in_mask;      // bit r: tile r lies inside N
  const uint8_t* aux;
  long long aux_group;  // bytes between groups (N elements)
  int aux_bytes;        // 16 (scales), 8 (zeros) or 0
  uint32_t aux_dst;     // ring offset of this lane's aux in stage 0
  int aux_stage;        // ring bytes between stages' aux of this lane
  int bpg;              // blocks of 128 per group
  const T* x_src;       // this lane's first x chunk (row lane / 16), then + 2 rows per further chunk
  long long x_step;     // elements between this lane's chunks (2 rows)
  uint32_t x_dst;       // ring offset of this lane's first chunk in stage 0
  int x_chunks;         // chunks this lane copies per block

  __device__ __forceinline__ Stream(const Args& a, int n0, int lane) : ring_layout(a.M) {
    constexpr int RO = GLU ? R / 2 : R;
    const int g = lane >> 2, t = lane & 3, rows_w = GLU ? 2 * a.N : a.N;
    in_mask = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool in = n0 + 8 * (r % RO) < a.N;
      in_mask |= in << r;
      w[r] = a.qweight + (long long)((in ? tile_row<R, GLU>(n0, r, a.N) : 0) + g) * (a.K / 8) + 4 * t;
    }
    const int r = lane < 16 ? lane : lane - 16;
    const bool scale = lane < R, zero = lane >= 16 && lane < 16 + R;
    aux_bytes = ((in_mask >> r) & 1) == 0 ? 0 : scale ? 16 : zero ? 8 : 0;
    const int row = r < R && aux_bytes != 0 ? tile_row<R, GLU>(n0, r, a.N) : 0;
    aux = scale ? reinterpret_cast<const uint8_t*>(static_cast<const T*>(a.scales) + row) : a.zeros + row;
    aux_group = scale ? (long long)rows_w * sizeof(T) : rows_w;
    aux_dst = scale ? ring_layout.scales + r * 16 : ring_layout.zeros + r * 8;
    aux_stage = scale ? R * 16 : R * 8;
    bpg = a.blocks_per_group;
    const int m0 = lane >> 4;
    x_src = static_cast<const T*>(a.x) + m0 * a.sx + 8 * (lane & 15);
    x_step = 2 * a.sx;
    x_dst = ring_layout.x + m0 * kXPitch + 16 * (lane & 15);
    x_chunks = m0 < a.M ? (a.M - m0 + 1) / 2 : 0;
  }

  // Requests block blk's weights, scales and zeros into ring stage `stage` (nothing when blk >= hi).
  __device__ __forceinline__ void issue_weights(uint32_t ring, int lane, int blk, int hi, int stage) const {
    if (blk >= hi) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
      sparsevila::cp_async16(ring + ((stage * R + r) * 32 + lane) * 16, w[r] + blk * 16, (in_mask >> r) & 1 ? 16 : 0);
    if (aux_bytes != 0) {
      const uint8_t* src_aux = aux + (bpg == 1 ? blk : blk / bpg) * aux_group;
      const uint32_t dst = ring + aux_dst + stage * aux_stage;
      if (aux_bytes == 16)
        sparsevila::cp_async16(dst, src_aux, 16);
      else
        sparsevila::cp_async8(dst, src_aux, 8);
    }
  }

  // Requests block blk's x rows into ring stage `stage` (nothing when blk >= hi; M rows per stage).
  template <int MT>
  __device__ __forceinline__ void issue_x(uint32_t ring, int blk, int hi, int stage, int M) const {
    if (blk >= hi) return;
    const T* src = x_src + (long long)blk * kPackK;
    const uint32_t dst = ring + x_dst + stage * M * kXPitch;
#pragma unroll
    for (int i = 0; i < 4 * MT; ++i)  // 16 M chunks over 32 lanes: at most 4 (M <= 8) or 8 per lane
      if (i < x_chunks) sparsevila::cp_async16(dst + i * 2 * kXPitch, src + i * x_step, 16);
  }
};

// (a & b) | c in one LOP3: with two constants ptxas emits an AND and an OR with immediates, two instructions.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// MAGIC + z exactly as an fp32, z in [0, 127]: z written into the mantissa of MAGIC (bf16: 128 = 2^7, unit at
// bit 16; fp16: 1024 = 2^10, unit at bit 13), no int-to-float conversion.
template <typename T>
__device__ __forceinline__ float magic_plus(uint32_t z) {
  return std::is_same<T, __half>::value ? __uint_as_float(0x44800000u | (z << 13))
                                         : __uint_as_float(0x43000000u | (z << 16));
}

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  }
}

// acc += the contribution of the block held in ring stage `stage` for the warp's R tiles (module doc). AW (weights
// as the MMA's A operand, M <= 8, R even): tiles 2p and 2p + 1 are the 16 rows of one A tile (row g of each, the
// operands the B form would use), x's row g is B's column g (2 registers, no zero rows, shared by the R / 2 MMAs),
// so a slice takes R / 2 + 1 MMAs instead of R + 1; acc[r][i] is then (tile r's row g, x row 2t + i).
template <typename T, int R, int S, int MT, bool AW>
__device__ __forceinline__ void compute(float (&acc)[R][4], const uint8_t* ring, const Ring<R, S>& L, int M,
                                        int lane, int stage) {
  constexpr uint32_t kMask = 0x000F000Fu;
  const int g = lane >> 2, t = lane & 3;
  uint32_t pairs[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint4 w = reinterpret_cast<const uint4*>(ring)[(stage * R + r) * 32 + lane];
    pairs[r][0] = __byte_perm(w.x, w.y, 0x5410);  // words 4t, 4t+1: nibbles 0-3 of each
    pairs[r][1] = __byte_perm(w.z, w.w, 0x5410);  // words 4t+2, 4t+3
    pairs[r][2] = __byte_perm(w.x, w.y, 0x7632);  // nibbles 4-7
    pairs[r][3] = __byte_perm(w.z, w.w, 0x7632);
  }
  // x's rows g, g + 8 (rows past M read row 0, whose outputs are never stored): k = 16 j + 4t + 0..3 at byte 32 j + 8 t
  const uint8_t* xs_stage = ring + L.x + stage * M * kXPitch + 8 * t;
  if constexpr (AW) {
    static_assert(MT == 1 && R % 2 == 0, "weights as A: x rows <= 8, pairs of tiles");
    // x rows past M read row 0 unzeroed: B's column g reaches only output column g (x row g), never stored
    const uint8_t* xrow = xs_stage + (g < M ? g : 0) * kXPitch;
    constexpr uint32_t kOnes[4] = {Magic<T>::kOne2, Magic<T>::kOne2, Magic<T>::kOne2, Magic<T>::kOne2};
    float xs[4] = {0.f, 0.f, 0.f, 0.f}, c[R / 2][4] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint2 v = *reinterpret_cast<const uint2*>(xrow + 32 * j);
      const uint32_t b0 = v.x, b1 = v.y;  // k slots 2t, 2t+1 / 2t+8, 2t+9 of x row g
      Mma<T>::run(xs, kOnes, b0, b1);
      const int sh = 4 * (j & 3), hi = (j >> 2) * 2;
#pragma unroll
      for (int p = 0; p < R / 2; ++p) {
        const uint32_t a[4] = {and_or(pairs[2 * p][hi] >> sh, kMask, Magic<T>::kBits2),
                               and_or(pairs[2 * p + 1][hi] >> sh, kMask, Magic<T>::kBits2),
                               and_or(pairs[2 * p][hi + 1] >> sh, kMask, Magic<T>::kBits2),
                               and_or(pairs[2 * p + 1][hi + 1] >> sh, kMask, Magic<T>::kBits2)};
        Mma<T>::run(c[p], a, b0, b1);
      }
    }
    // c[p][0], c[p][1]: (tile 2p's row g, x rows 2t, 2t+1); c[p][2], c[p][3]: tile 2p+1's row g; xs[0], xs[1]:
    // sum x of rows 2t, 2t+1
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s = static_cast<float>(reinterpret_cast<const T*>(ring + L.scales + (stage * R + r) * 16)[g]);
      const float off = -s * magic_plus<T>((ring + L.zeros + (stage * R + r) * 8)[g]);
#pragma unroll
      for (int i = 0; i < 2; ++i) acc[r][i] = fmaf(off, xs[i], fmaf(s, c[r / 2][2 * (r & 1) + i], acc[r][i]));
    }
    return;
  }
  // x rows past M read row 0 unzeroed: A's row m reaches only output row m, never stored
  const uint8_t* xrow[2] = {xs_stage + (g < M ? g : 0) * kXPitch, xs_stage + (g + 8 < M ? g + 8 : 0) * kXPitch};
  // slice-major: the R tiles' MMA chains and the x sums' are independent, so they interleave
  float xs[4] = {0.f, 0.f, 0.f, 0.f}, c[R][4] = {};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t xa[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int h = 0; h < MT; ++h) {
      const uint2 v = *reinterpret_cast<const uint2*>(xrow[h] + 32 * j);
      xa[h] = v.x;
      xa[2 + h] = v.y;
    }
    Mma<T>::run(xs, xa, Magic<T>::kOne2, Magic<T>::kOne2);
    const int sh = 4 * (j & 3), hi = (j >> 2) * 2;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t b0 = and_or(pairs[r][hi] >> sh, kMask, Magic<T>::kBits2);
      const uint32_t b1 = and_or(pairs[r][hi + 1] >> sh, kMask, Magic<T>::kBits2);
      Mma<T>::run(c[r], xa, b0, b1);
    }
  }
  // c[r][0], c[r][1]: (m = g, n = 2t, 2t+1); c[r][2], c[r][3]: (m = g + 8, same n); xs likewise (equal along n)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float2 s = to_float2<T>(reinterpret_cast<const uint32_t*>(ring + L.scales + (stage * R + r) * 16)[t]);
    const uint32_t zz = reinterpret_cast<const uint16_t*>(ring + L.zeros + (stage * R + r) * 8)[t];
    const float sc[2] = {s.x, s.y};
    const float off[2] = {-s.x * magic_plus<T>(zz & 0xFF), -s.y * magic_plus<T>(zz >> 8)};
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[r][i] = fmaf(off[i & 1], xs[i], fmaf(sc[i & 1], c[r][i], acc[r][i]));
  }
}

template <typename T, int R, int S, int MT, bool GLU, bool AW>
__global__ void __launch_bounds__(256) w4a16_kernel(const __grid_constant__ Args a, int kwarps, int pdl) {
  constexpr int RO = GLU ? R / 2 : R;  // tiles of output rows per warp
  static_assert(RO >= 1, "glu needs an even number of tiles per warp (gate and up)");
  extern __shared__ __align__(16) uint8_t smem[];  // W rings, then (drained) the W partials [W][16 m][8 R n]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int wn = warp / kwarps, wk = warp % kwarps;  // row group of the CTA, K range
  const int n0 = (blockIdx.x * (W / kwarps) + wn) * 8 * RO;
  const int nb = a.K / kPackK;
  const int lo = (int)((long long)wk * nb / kwarps), hi = (int)((long long)(wk + 1) * nb / kwarps);
  const Stream<T, R, S, GLU> st(a, n0, lane);
  const Ring<R, S>& L = st.ring_layout;
  uint8_t* ring = smem + warp * L.bytes;
  const uint32_t ring_u32 = sparsevila::smem_u32(ring);

  // prologue: the first S - 1 blocks' weights (one group each) before the dependency wait, their x after it
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    st.issue_weights(ring_u32, lane, lo + s, hi, s);
    sparsevila::cp_async_commit();
  }
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
#pragma unroll
  for (int s = 0; s < S - 1; ++s) st.template issue_x<MT>(ring_u32, lo + s, hi, s, a.M);
  sparsevila::cp_async_commit();
  sparsevila::cp_async_wait<0>();
  float acc[R][4] = {};
  for (int b = lo, stage = 0; b < hi; ++b, stage = stage == S - 1 ? 0 : stage + 1) {
    __syncwarp();  // every lane is done with the stage refilled next (read in the previous iteration)
    const int refill = stage == 0 ? S - 1 : stage - 1;
    st.issue_weights(ring_u32, lane, b + S - 1, hi, refill);
    st.template issue_x<MT>(ring_u32, b + S - 1, hi, refill, a.M);
    sparsevila::cp_async_commit();       // one group per block, empty ones too: the wait counts groups
    sparsevila::cp_async_wait<S - 1>();  // block b's group has landed (for this lane) ...
    __syncwarp();                        // ... and for every lane (scales, zeros and x come from other lanes)
    compute<T, R, S, MT, AW>(acc, ring, L, a.M, lane, stage);
  }
  sparsevila::cp_async_wait<0>();
  __syncthreads();

  float* red = reinterpret_cast<float*>(smem);  // [W][16 m][8 R n]: tile r's columns 8 r .. 8 r + 7
  const int g = lane >> 2, t = lane & 3, cols = 8 * R, out_cols = 8 * RO, rows = out_cols * (W / kwarps);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < (AW ? 2 : 4); ++i) {
      const int m = AW ? 2 * t + i : g + 8 * (i >> 1), n = AW ? g : 2 * t + (i & 1);
      red[(warp * 16 + m) * cols + 8 * r + n] = acc[r][i];
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < a.M * rows; idx += blockDim.x) {
    const int m = idx / rows, c = idx % rows, n = blockIdx.x * rows + c;
    if (n >= a.N) continue;
    const float* part = red + ((c / out_cols) * kwarps * 16 + m) * cols + c % out_cols;
    const T* bias = static_cast<const T*>(a.bias);
    float y = 0.f;
    for (int w = 0; w < kwarps; ++w) y += part[w * 16 * cols];  // the K ranges in order: deterministic
    if (bias != nullptr) y += static_cast<float>(bias[n]);
    if constexpr (GLU) {  // the up row's sum sits RO tiles further
      float up = 0.f;
      for (int w = 0; w < kwarps; ++w) up += part[w * 16 * cols + out_cols];
      if (bias != nullptr) up += static_cast<float>(bias[a.N + n]);
      y = sparsevila::glu<T>(y, up);
    }
    static_cast<T*>(a.out)[(long long)m * a.N + n] = static_cast<T>(y);
  }
}

template <int R, int S>
int smem_bytes(int warps, int M) {
  const int ring = Ring<R, S>(M).bytes, partials = 16 * 8 * R * 4;
  return warps * (ring > partials ? ring : partials);
}

template <typename T, int R, int S, int MT, bool GLU, bool AW>
cudaError_t launch(const Args& a, int warps, int kwarps, int pdl, cudaStream_t stream) {
  auto kernel = w4a16_kernel<T, R, S, MT, GLU, AW>;
  static std::atomic<uint64_t> configured{0};
  cudaError_t e = sparsevila::once_per_device(configured, [&] {  // allow up to the device's opt-in maximum
    int dev = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return err != cudaSuccess ? err : cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  });
  if (e != cudaSuccess) return e;
  const int rows = 8 * (GLU ? R / 2 : R) * (warps / kwarps);
  return sparsevila::launch_pdl(kernel, dim3((a.N + rows - 1) / rows), dim3(32 * warps), smem_bytes<R, S>(warps, a.M),
                                stream, pdl, a, kwarps, pdl);
}

// fn(Tag<T>, Int<R>, Int<S>, Int<MT>, Int<GLU>, Int<AW>) for the compiled instantiation (glu: R 2 or 4; aw: R 2
// or 4 and m <= 8); `fallback` when there is none.
template <typename Fn>
int dispatch(int dtype, int tiles, int stages, int m, int glu, int aw, int fallback, Fn&& fn) {
  using sparsevila::dispatch_int;
  return sparsevila::dispatch_dtype(dtype, fallback, [&](auto t) {
    return dispatch_int<1, 2, 4>(tiles, fallback, [&](auto r) {
      constexpr bool one_tile = decltype(r)::value == 1;  // no glu or aw: they need pairs of tiles
      return dispatch_int<2, 4, 6, 8>(stages, fallback, [&](auto s) {
        return dispatch_int<0, 1>(glu, fallback, [&](auto g) {
          constexpr bool glu_on = decltype(g)::value == 1;
          return dispatch_int<0, 1>(aw, fallback, [&](auto w) {
            if constexpr ((glu_on || decltype(w)::value == 1) && one_tile) {
              return fallback;
            } else if constexpr (decltype(w)::value == 1) {
              return m <= 8 ? fn(t, r, s, Int<1>{}, g, w) : fallback;
            } else {
              return m <= 8 ? fn(t, r, s, Int<1>{}, g, w) : fn(t, r, s, Int<2>{}, g, w);
            }
          });
        });
      });
    });
  });
}

}  // namespace

extern "C" {

int svo_w4a16_linear(int dtype, const void* x, const int* qweight, const void* scales, const uint8_t* zeros,
                     const void* bias, void* out, int M, int N, int K, int group, long long sx, int glu,
                     int tiles, int warps, int kwarps, int stages, int aw, int pdl, void* stream) {
  if (M < 1 || M > 16 || N < 8 || N % 8 || K < kPackK || group < kPackK || K % group || group % kPackK ||
      warps < 1 || warps > 8 || kwarps < 1 || warps % kwarps || (glu && tiles < 2) || (aw && (tiles < 2 || M > 8)))
    return cudaErrorInvalidValue;
  const Args a{x, qweight, scales, zeros, bias, out, M, N, K, group / kPackK, sx};
  return dispatch(dtype, tiles, stages, M, glu, aw, cudaErrorInvalidValue,
                  [&](auto t, auto r, auto s, auto mt, auto g, auto w) -> int {
                    using T = typename decltype(t)::type;
                    return launch<T, decltype(r)::value, decltype(s)::value, decltype(mt)::value,
                                  decltype(g)::value == 1, decltype(w)::value == 1>(
                        a, warps, kwarps, pdl, static_cast<cudaStream_t>(stream));
                  });
}

}  // extern "C"
