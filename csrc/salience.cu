// visual_salience, cuda backend (sm_80+ instructions; built for sm_90a by sparsevila_ops/_cuda.py): the two
// passes of triton_kernels/salience.py with mma.sync tensor cores, cp.async multi-stage tiles and part of the
// exp2s on the FMA pipe (polynomial), deterministic by construction (no atomics anywhere).
//
// Math (docs/ops.md, visual_salience), log2 domain, qk_scale2 = scale * log2 e, for segment [a, b), rows
// R = [a, r_end) (r_end = b when num_summary == 0, else a + min(num_summary, b - a)), head h:
//   pass 1 (salience_kernel<.., kPassLse, ..>):  lse2[h, i] = log2 sum_{j in [a, b)} 2^(qk_scale2 q_i . k_j), i in R
//   pass 2 (salience_kernel<.., kPassColsum, ..>): dst[h, j] = 1/|R| sum_{i in R} 2^(qk_scale2 q_i . k_j - lse2[h, i])
// where pass 2 reads lse2 * lse_scale (lse_scale = 1 for pass 1's scratch, log2 e for a natural-log lse given).
// Heads reduced: pass 2 writes fp32 [H, T] partials and salience_sum_heads_kernel adds them in head order.
//
// One kernel template does both passes. A CTA (kWarps = 4 warps) owns a block of kBlockRows = 128 "resident"
// rows (pass 1: query rows of R, pass 2: keys of the segment), 32 per warp (kMT = 2 MMA m-tiles of 16), held
// as mma A fragments in registers (loaded once from global). It streams the segment's other operand (pass 1:
// the keys [a, b); pass 2: the query rows R, plus their lse) in tiles of kTileRows = 64 rows through a
// kStages-deep cp.async ring in shared memory (rows past the end and head-dim padding zero-filled), and per
// 16-row chunk of a tile computes C = A B^T with m16n8k16 (B fragments by ldmatrix, non-transposed):
//   pass 1: C = Q K^T, 16 query rows x 8 keys per MMA; online max/sum per (thread, row) over the thread's own
//           columns (no shuffles in the loop; the running max is raised only when some lane's grew, one vote per
//           chunk), then one log-sum-exp merge over the 4 lanes of a quad at the end;
//   pass 2: C = K Q^T (S transposed: keys are the MMA's m, queries its n), p = 2^(qk_scale2 s - lse2[q]) summed
//           into per-thread registers (2 keys per m-tile), then one quad shuffle-sum at the end.
// Head dims 64 / 72 / 80 / 128: the MMA k dimension is D rounded up to 16 (72 -> 80), zero-filled in both
// operands. Element (row, d) of q/k is at base + row * stride_t + h * stride_h + d (elements); every row must
// start 16-byte aligned (the host checks it and copies otherwise).
//
// exp2 split: pair p of a thread's C fragment (two adjacent columns of one row; 16 pairs per m-tile and tile)
// goes to the polynomial of exp2.cuh when kPolyEvery > 0 and p % kPolyEvery == kPolyEvery - 1, else to MUFU.
#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "cp_async.cuh"
#include "exp2.cuh"
#include "launch_util.cuh"
#include "salience_launch.cuh"
#include "mbarrier.cuh"
#include "mma_sync.cuh"
#include "sparsevila_cuda.h"

namespace {

using sparsevila::cp_async16;
using sparsevila::cp_async4;
using sparsevila::cp_async_commit;
using sparsevila::cp_async_wait;
using sparsevila::ex2_mufu;
using sparsevila::ex2_pair;
using sparsevila::ldsm_x4;
using sparsevila::Mma;
using sparsevila::smem_u32;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMT = 2;                          // m-tiles (16 resident rows each) per warp
constexpr int kBlockRows = kWarps * kMT * 16;   // resident rows per CTA: 128
constexpr int kTileRows = 64;                   // streamed rows per tile (4 chunks of 16)
constexpr int kChunks = kTileRows / 16;
constexpr int kStages = 3;
constexpr int kPassLse = 1;
constexpr int kPassColsum = 2;

static_assert(kBlockRows == 128 && kTileRows % 16 == 0, "tile shape");

template <int D>
struct Shape {
  static_assert(D % 8 == 0 && D >= 16 && D <= 128, "head dim");
  static constexpr int kDP = (D + 15) / 16 * 16;   // MMA k extent: D padded to 16
  static constexpr int kKSteps = kDP / 16;
  static constexpr int kRowChunks = kDP / 8;       // 16-byte chunks per smem row (those past D zero-filled)
  static constexpr int kPitch = kDP * 2 + 16;      // bytes; +16: ldmatrix rows hit distinct banks
  static constexpr int kTileBytes = kTileRows * kPitch;
  static constexpr int kStageBytes = kTileBytes + kTileRows * 4;  // + the tile's lse (pass 2)
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kPitch % 16 == 0 && kStageBytes % 16 == 0, "cp.async needs 16-byte aligned rows");
};

struct Args {
  const void* q;
  const void* k;
  const int* cu;       // cu_seqlens, stride cu_s
  const float* lse;    // pass 2: [H, T] row stride lse_sh (log2 units x 1/lse_scale); unused by pass 1
  float* dst;          // pass 1: lse2 [H, T]; pass 2: salience [H, T]; row stride dst_sh
  int64_t q_st, q_sh, k_st, k_sh, cu_s, lse_sh, dst_sh;
  float qk_scale2;     // scale * log2 e
  float lse_scale;     // 1 (log2 lse) or log2 e (natural lse)
  int num_summary;
  int nblk;            // CTAs per segment along grid x
};

template <typename T, int D, int kPass, int kPolyEvery>
__global__ void __launch_bounds__(kThreads) salience_kernel(const __grid_constant__ Args a) {
  using S = Shape<D>;
  constexpr int KS = S::kKSteps;
  extern __shared__ __align__(128) unsigned char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seg = blockIdx.x / a.nblk, blk = blockIdx.x % a.nblk;
  const int64_t h = blockIdx.y;
  const int sa = a.cu[seg * a.cu_s], sb = a.cu[(seg + 1) * a.cu_s];
  assert(sa <= sb);  // cu_seqlens non-decreasing (host-checked only for CPU tensors / SPARSEVILA_DEBUG)
  const int r_end = a.num_summary == 0 ? sb : sa + min(a.num_summary, sb - sa);
  // Resident rows [res0, res_end) of this CTA; streamed rows [sa, str_end).
  const int res0 = sa + blk * kBlockRows;
  const int res_end = kPass == kPassLse ? r_end : sb;
  const int str_end = kPass == kPassLse ? sb : r_end;
  if (res0 >= res_end) return;  // the whole CTA, before any barrier (also: empty segments)
  const int n_str = str_end - sa;  // >= 1: the segment is not empty (and |R| >= 1)
  const int n_tiles = (n_str + kTileRows - 1) / kTileRows;

  const T* res_base = static_cast<const T*>(kPass == kPassLse ? a.q : a.k) + h * (kPass == kPassLse ? a.q_sh : a.k_sh);
  const int64_t res_st = kPass == kPassLse ? a.q_st : a.k_st;
  const T* str_base = static_cast<const T*>(kPass == kPassLse ? a.k : a.q) + h * (kPass == kPassLse ? a.k_sh : a.q_sh);
  const int64_t str_st = kPass == kPassLse ? a.k_st : a.q_st;
  const float* lse_base = kPass == kPassColsum ? a.lse + h * a.lse_sh : nullptr;

  // Streamed tile t (rows sa + 64 t + r) into ring slot t % kStages: rows past str_end and the head-dim padding
  // zero-filled; pass 2 also stages the rows' lse (+inf past str_end: p = 2^-inf = 0 there).
  auto load_tile = [&](int t) {
    unsigned char* slot = smem + (t % kStages) * S::kStageBytes;
    const int row0 = sa + t * kTileRows;
    for (int e = threadIdx.x; e < kTileRows * S::kRowChunks; e += kThreads) {
      const int r = e / S::kRowChunks, c = e % S::kRowChunks;
      const bool ok = row0 + r < str_end && c * 8 < D;
      const T* src = ok ? str_base + (int64_t)(row0 + r) * str_st + c * 8 : str_base;
      cp_async16(smem_u32(slot + r * S::kPitch + c * 16), src, ok ? 16 : 0);
    }
    if (kPass == kPassColsum) {
      float* ls = reinterpret_cast<float*>(slot + S::kTileBytes);
      for (int r = threadIdx.x; r < kTileRows; r += kThreads) {
        if (row0 + r < str_end)
          cp_async4(smem_u32(ls + r), lse_base + row0 + r);
        else
          ls[r] = INFINITY;
      }
    }
  };

  // Start the ring before the register loads below, so both are in flight together.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s);
    cp_async_commit();  // always: the group count stays in step with the tile index
  }

  // Resident A fragments of m16n8k16 (row-major 16 x 16 per k-step): reg 0 = (row g, d c..c+1), 1 = (g + 8, c),
  // 2 = (g, c + 8), 3 = (g + 8, c + 8), g = lane / 4, c = 16 kk + 2 (lane % 4). Zero past res_end and D.
  const int wrow0 = res0 + warp * (kMT * 16);
  const bool active = wrow0 < res_end;  // warp-uniform: a warp with no valid row only keeps the barriers
  uint32_t af[kMT][KS][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = wrow0 + mt * 16 + lane / 4 + (i & 1) * 8;
        const int d = kk * 16 + (lane % 4) * 2 + (i >> 1) * 8;
        af[mt][kk][i] = (row < res_end && d < D)
                            ? *reinterpret_cast<const uint32_t*>(res_base + (int64_t)row * res_st + d)
                            : 0u;
      }

  // Per-thread state. Pass 1: running max m (log2 units) and sum l of row (mt, half) over this thread's
  // columns. Pass 2: column sums of key (mt, half). Row/key of (mt, half) = wrow0 + 16 mt + lane / 4 + 8 half.
  float m_run[kMT][2], l_run[kMT][2], acc[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      m_run[mt][hf] = -INFINITY;
      l_run[mt][hf] = 0.f;
      acc[mt][hf] = 0.f;
    }

  const int mi = lane / 8, lr = lane % 8;  // ldmatrix: this lane addresses row lr of 8x8 matrix mi
  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile t landed
    __syncthreads();               // everyone's copies landed, and everyone is done with tile t - 1's slot
    if (t + kStages - 1 < n_tiles) load_tile(t + kStages - 1);  // into the slot of tile t - 1
    cp_async_commit();
    if (!active) continue;

    const unsigned char* slot = smem + (t % kStages) * S::kStageBytes;
    const int valid = n_str - t * kTileRows;  // streamed rows of this tile that exist (>= 1; >= 64: all)
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
      // B fragments for streamed rows 16 ch .. 16 ch + 15 (two n-tiles): matrices (rows +0..7, d +0..7),
      // (+0..7, +8..15), (+8..15, +0..7), (+8..15, +8..15) -> b0, b1 of n-tile 0, then of n-tile 1.
      uint32_t bf[KS][4];
      const uint32_t bbase = smem_u32(slot + (ch * 16 + (mi >> 1) * 8 + lr) * S::kPitch + (mi & 1) * 16);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) ldsm_x4(bbase + kk * 32, bf[kk]);
      // C[mt][j]: rows wrow0 + 16 mt + lane/4 (+8 for c2, c3), streamed columns 16 ch + 8 j + 2 (lane%4) (+1).
      float c[kMT][2][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          c[mt][j][0] = c[mt][j][1] = c[mt][j][2] = c[mt][j][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < KS; ++kk) Mma<T>::run(c[mt][j], af[mt][kk], bf[kk][2 * j], bf[kk][2 * j + 1]);
        }
      const int col0 = ch * 16 + (lane % 4) * 2;  // this thread's first column in the tile (+8 j + e)

      if constexpr (kPass == kPassLse) {
        if (valid < kTileRows) {  // the segment's last key tile: keys past b get -inf
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (col0 + 8 * j + (e & 1) >= valid) {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) c[mt][j][e] = -INFINITY;
              }
        }
        // Raise the running max of a row when this chunk's exceeds it (scale > 0 commutes with max).
        float m_new[kMT][2];
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float cm = fmaxf(fmaxf(c[mt][0][2 * hf], c[mt][0][2 * hf + 1]),
                                   fmaxf(c[mt][1][2 * hf], c[mt][1][2 * hf + 1]));
            m_new[mt][hf] = fmaxf(m_run[mt][hf], cm * a.qk_scale2);
            grow |= m_new[mt][hf] > m_run[mt][hf];
          }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              // m_new == -inf only while every column seen was masked (then l is 0 and stays 0).
              const float safe = m_new[mt][hf] == -INFINITY ? 0.f : m_new[mt][hf];
              l_run[mt][hf] *= ex2_mufu(m_run[mt][hf] - safe);  // 1 when this row's max did not grow
              m_run[mt][hf] = m_new[mt][hf];
            }
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float neg = m_run[mt][hf] == -INFINITY ? 0.f : -m_run[mt][hf];
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
              for (int e = 2 * hf; e < 2 * hf + 2; ++e)
                l_run[mt][hf] += ex2_pair<kPolyEvery>(fmaf(c[mt][j][e], a.qk_scale2, neg), (ch * 2 + j) * 2 + hf);
          }
      } else {
        // lse2 of this thread's 4 query columns (+inf past R), then p = 2^(qk_scale2 s - lse2) into the sums.
        const float* ls = reinterpret_cast<const float*>(slot + S::kTileBytes);
        float nl[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float2 v = *reinterpret_cast<const float2*>(ls + col0 + 8 * j);
          nl[j][0] = -v.x * a.lse_scale;
          nl[j][1] = -v.y * a.lse_scale;
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc[mt][e >> 1] += ex2_pair<kPolyEvery>(fmaf(c[mt][j][e], a.qk_scale2, nl[j][e & 1]),
                                                      (ch * 2 + j) * 2 + (e >> 1));
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending; keep the ring quiet before exit anyway
  if (!active) return;

  // Quad merge (lanes 4g .. 4g + 3 hold the same rows) and store by the quad's first lane.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = wrow0 + mt * 16 + lane / 4 + hf * 8;
      if constexpr (kPass == kPassLse) {
        float mx = m_run[mt][hf];
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float safe = mx == -INFINITY ? 0.f : mx;  // finite for every row of R (key a is in lane 4g's columns)
        float l = l_run[mt][hf] * ex2_mufu(m_run[mt][hf] - safe);
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (lane % 4 == 0 && row < res_end) a.dst[h * a.dst_sh + row] = mx + log2f(l);
      } else {
        float v = acc[mt][hf];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (lane % 4 == 0 && row < res_end) a.dst[h * a.dst_sh + row] = v * __frcp_rn(static_cast<float>(r_end - sa));
      }
    }
}

// out[j] = inv_heads * sum_h part[h, j], heads added in order 0..H-1 (the Triton backend's _sum_heads_kernel).
__global__ void __launch_bounds__(256) salience_sum_heads_kernel(const float* part, float* out, int T, int H,
                                                                 int64_t stride_ph, float inv_heads) {
  const int j = blockIdx.x * 256 + threadIdx.x;
  if (j >= T) return;
  float acc = 0.f;
  for (int h = 0; h < H; ++h) acc += part[h * stride_ph + j];
  out[j] = acc * inv_heads;
}

template <typename T, int D, int kPass, int kPolyEvery>
cudaError_t launch(const Args& a, int num_segments, int heads, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};  // per instantiation: the devices it was configured on
  return sparsevila::launch_segments(salience_kernel<T, D, kPass, kPolyEvery>, configured, Shape<D>::kSmemBytes,
                                     kThreads, a, a.nblk, num_segments, heads, stream);
}

template <int kPass>
int run_pass(int dtype, int head_dim, const void* q, const void* k, const int* cu, const float* lse, float lse_scale,
             float* dst, float qk_scale2, const int64_t* strides, int num_segments, int max_rows, int heads,
             int num_summary, int poly_every, void* stream) {
  if (num_segments <= 0 || max_rows < 0 || num_summary < 0) return static_cast<int>(cudaErrorInvalidValue);
  Args a{q, k, cu, lse, dst, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
         qk_scale2, lse_scale, num_summary, (max(max_rows, 1) + kBlockRows - 1) / kBlockRows};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return sparsevila::dispatch_salience(dtype, head_dim, poly_every, [&](auto t, auto d, auto p) {
    using T = typename decltype(t)::type;
    return static_cast<int>(launch<T, decltype(d)::value, kPass, decltype(p)::value>(a, num_segments, heads, s));
  });
}

}  // namespace

extern "C" {

int svo_salience_lse(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* lse2,
                     float qk_scale2, const int64_t* strides, int num_segments, int max_rows, int heads,
                     int num_summary, int poly_every, void* stream) {
  return run_pass<kPassLse>(dtype, head_dim, q, k, cu_seqlens, nullptr, 1.f, lse2, qk_scale2, strides,
                            num_segments, max_rows, heads, num_summary, poly_every, stream);
}

int svo_salience_colsum(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                        const float* lse, float lse_scale, float* out, float qk_scale2, const int64_t* strides,
                        int num_segments, int max_seqlen, int heads, int num_summary, int poly_every, void* stream) {
  return run_pass<kPassColsum>(dtype, head_dim, q, k, cu_seqlens, lse, lse_scale, out, qk_scale2, strides,
                               num_segments, max_seqlen, heads, num_summary, poly_every, stream);
}

int svo_salience_sum_heads(const float* part, float* out, int tokens, int heads, int64_t stride_ph, float inv_heads,
                           void* stream) {
  if (tokens <= 0) return 0;
  salience_sum_heads_kernel<<<(tokens + 255) / 256, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      part, out, tokens, heads, stride_ph, inv_heads);
  return static_cast<int>(cudaGetLastError());
}

int svo_salience_block_rows() { return kBlockRows; }

}  // extern "C"
