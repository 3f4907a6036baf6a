// Experiment (bench only; measured and not adopted, bench/NOTES.md "Salience: both passes in one kernel"): the
// visual_salience column sums with the LSE not given, for segments whose keys all fit one CTA's registers (n <= 768
// at head dims 64-80, n <= 384 at 128), with one exp2 and one QK^T per score where the two passes of
// csrc/salience.cu / csrc/salience_wgmma.cu take two of each (one for each row's log-sum-exp, one for the column
// sums). Driven by bench/salience_fused_probe.cu (its header has the build line).
//
// Math (docs/ops.md, visual_salience), log2 domain, qk_scale2 = scale * log2 e, segment [a, b) of n keys, rows
// R = [a, r_end) (r_end = b when num_summary == 0, else a + min(num_summary, n)), head h, for each row i of R:
//   M_i = max_j qk_scale2 s_ij,  p_ij = 2^(qk_scale2 s_ij - M_i),  L_i = sum_j p_ij   (j over all n keys)
//   dst[h, j] = 1/|R| sum_{i in R} p_ij / L_i                       (= the mean over R of softmax_i(j))
// Both M_i and L_i need the whole row, so the CTA holds the whole row: one CTA per (segment, head), kWarps = 12
// warps, warp w owning keys [8 kNT w, 8 kNT (w + 1)) of the segment as mma.sync B fragments in registers (loaded
// once from global; zero past n and past D). The rows of R stream through a kStages-deep cp.async ring in tiles
// of 64 (zero-filled past r_end and D), and per chunk of 16 rows (ldmatrix A fragments) each warp computes
// S = Q K^T for its keys (m16n8k16: rows g = lane / 4 and g + 8, keys 8 j + 2 (lane % 4) + {0, 1}), then:
//   1. its row maxima over its keys (thread, then the quad's 4 lanes) into shared memory, one arrival on bar_m;
//      once all 12 arrived: M_i;
//   2. p = 2^(qk_scale2 s - M_i) (keys past n: s = -inf, p = 0) into the warp's p buffer in shared memory, the row
//      sums the same way through bar_l;
//   3. the next chunk's S and maxima (so that a warp's tensor work overlaps the other warps' exps), then L_i and
//      each key's column sum += p_ij / L_i over the chunk's rows of R (w_i = 0 for rows past r_end).
// The exchanges add the warps' partials in warp order and the final column sums over the lanes in a fixed order
// (no atomics: bitwise reproducible). Per-head output [H, T] only (the probe's). exp2 split between MUFU and the
// polynomial as in salience.cu (ex2_pair, pair = one row's two adjacent keys of an n-tile).
#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "cp_async.cuh"
#include "exp2.cuh"
#include "launch_util.cuh"
#include "mbarrier.cuh"
#include "mma_sync.cuh"
#include "salience_launch.cuh"

namespace {

using sparsevila::cp_async16;
using sparsevila::cp_async_commit;
using sparsevila::cp_async_wait;
using sparsevila::ex2_pair;
using sparsevila::ldsm_x4;
using sparsevila::Mma;
using sparsevila::mbar_arrive;
using sparsevila::mbar_wait;
using sparsevila::smem_u32;

constexpr int kWarps = 12;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 64;  // streamed rows of R per ring slot: 4 chunks of 16
constexpr int kStages = 3;
constexpr int kRedStride = kWarps;  // floats per chunk row in the exchange arrays (rows of 48 bytes: float4 reads)

static_assert(kRedStride % 4 == 0, "exchange rows are read as float4");

template <int D>
struct Shape {
  static_assert(D % 8 == 0 && D >= 16 && D <= 128, "head dim");
  static constexpr int kDP = (D + 15) / 16 * 16;   // MMA k extent: D padded to 16
  static constexpr int kKSteps = kDP / 16;
  static constexpr int kRowChunks = kDP / 8;       // 16-byte chunks per smem row (those past D zero-filled)
  static constexpr int kPitch = kDP * 2 + 16;      // bytes; +16: ldmatrix rows hit distinct banks
  static constexpr int kTileBytes = kTileRows * kPitch;
  static constexpr int kRedBytes = 2 * 2 * 16 * kRedStride * 4;  // row maxima and row sums of two chunks
  static constexpr int kSmemBytes = kStages * kTileBytes + kRedBytes + kWarps * 32 * 16 * 8 /* p: 8 float4 a lane */
                                    + 16 /* bar_m, bar_l */;
  static_assert(kPitch % 16 == 0 && kTileBytes % 16 == 0, "cp.async needs 16-byte aligned rows");
};

// Key n-tiles (8 keys) per warp: 4 or 8 (CTA capacity 384 or 768 keys); at D = 128 only 4 (registers).
template <int D>
constexpr int max_key_tiles() {
  return D <= 80 ? 8 : 4;
}

// The exchanges' reductions, row maxima (M_i) and row sums (L_i): of two values, and of a partial and four warps'
// values (the sums in warp order).
struct Max {
  __device__ __forceinline__ float operator()(float x, float y) const { return fmaxf(x, y); }
  __device__ __forceinline__ float fold(float r, float4 v) const {
    return fmaxf(r, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
  }
};
struct Add {
  __device__ __forceinline__ float operator()(float x, float y) const { return x + y; }
  __device__ __forceinline__ float fold(float r, float4 v) const { return (((r + v.x) + v.y) + v.z) + v.w; }
};

struct Args {
  const void* q;
  const void* k;
  const int* cu;  // cu_seqlens, stride cu_s
  float* dst;     // salience [H, T], row stride dst_sh
  int64_t q_st, q_sh, k_st, k_sh, cu_s, dst_sh;
  float qk_scale2;  // scale * log2 e
  int num_summary;
};

template <typename T, int D, int kNT, int kPolyEvery>
__global__ void __launch_bounds__(kThreads, 1) salience_fused_kernel(const __grid_constant__ Args a) {
  using S = Shape<D>;
  constexpr int KS = S::kKSteps;
  extern __shared__ __align__(128) unsigned char smem[];
  // [2 chunks][16 rows][kRedStride]: the warps' row maxima and row sums of chunks of either parity
  float* red_m = reinterpret_cast<float*>(smem + kStages * S::kTileBytes);
  float* red_l = red_m + 2 * 16 * kRedStride;
  float4* pbuf = reinterpret_cast<float4*>(smem + kStages * S::kTileBytes + S::kRedBytes) +
                 (threadIdx.x / 32) * 32 * 8;  // this warp's p of one chunk: lane's j-th float4 at [32 j + lane]
  const uint32_t bar_m = smem_u32(smem + S::kSmemBytes - 16), bar_l = bar_m + 8;  // a phase per chunk, 12 arrivals

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seg = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int sa = a.cu[seg * a.cu_s], sb = a.cu[(seg + 1) * a.cu_s];
  assert(sa <= sb);  // cu_seqlens non-decreasing (host-checked only for CPU tensors / SPARSEVILA_DEBUG)
  const int n = sb - sa;
  if (n <= 0) return;  // the whole CTA, before any barrier
  assert(n <= kWarps * 8 * kNT);  // max_seqlen >= every segment's length picked kNT
  if (threadIdx.x == 0) {
    sparsevila::mbar_init(bar_m, kWarps);
    sparsevila::mbar_init(bar_l, kWarps);
  }  // the first tile's __syncthreads publishes them before any arrival
  const int n_rows = (a.num_summary == 0 ? n : min(a.num_summary, n));  // |R| >= 1
  const int n_tiles = (n_rows + kTileRows - 1) / kTileRows;

  const T* qb = static_cast<const T*>(a.q) + h * a.q_sh;
  const T* kb = static_cast<const T*>(a.k) + h * a.k_sh;

  // Tile t of R (rows sa + 64 t + r) into ring slot t % kStages, zero past R and the head-dim padding.
  auto load_tile = [&](int t) {
    unsigned char* slot = smem + (t % kStages) * S::kTileBytes;
    const int row0 = t * kTileRows;
    for (int e = threadIdx.x; e < kTileRows * S::kRowChunks; e += kThreads) {
      const int r = e / S::kRowChunks, c = e % S::kRowChunks;
      const bool ok = row0 + r < n_rows && c * 8 < D;
      const T* src = ok ? qb + (int64_t)(sa + row0 + r) * a.q_st + c * 8 : qb;
      cp_async16(smem_u32(slot + r * S::kPitch + c * 16), src, ok ? 16 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s);
    cp_async_commit();  // always: the group count stays in step with the tile index
  }

  // This warp's keys as B fragments of m16n8k16 (col-major 16 x 8 per k-step): b0 = (d c, c + 1; key g),
  // b1 = (d c + 8, c + 9; key g), g = lane / 4, c = 16 kk + 2 (lane % 4). Zero past n and D.
  const int key0 = warp * 8 * kNT;  // relative to sa
  const bool keys_here = key0 < n;  // warp-uniform: no key of this warp exists (its scores are all -inf)
  const bool keys_cut = key0 + 8 * kNT > n;  // warp-uniform: some of them do not
  uint32_t kf[kNT][KS][2];
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = key0 + 8 * j + lane / 4, d = 16 * kk + 2 * (lane % 4) + 8 * i;
        kf[j][kk][i] = (key < n && d < D) ? *reinterpret_cast<const uint32_t*>(kb + (int64_t)(sa + key) * a.k_st + d)
                                          : 0u;
      }

  // Column sums of key key0 + 8 j + 2 (lane % 4) + e over this thread's rows so far.
  float acc[kNT][2];
#pragma unroll
  for (int j = 0; j < kNT; ++j) acc[j][0] = acc[j][1] = 0.f;

  const int mi = lane / 8, lr = lane % 8;  // ldmatrix: this lane addresses row lr of 8x8 matrix mi
  const int g = lane / 4;
  const int n_chunks = (n_rows + 15) / 16;
  // Chunk ch's tile sits in ring slot (ch / 4) % kStages; a tile's first chunk waits for its copies and refills the
  // slot of the tile before it (every warp read that one: its chunks' MMAs precede this barrier in every warp).
  auto tile_barrier = [&](int ch) {
    const int t = ch / 4;
    cp_async_wait<kStages - 2>();  // this thread's copies of tile t landed
    __syncthreads();               // everyone's, and everyone is done with tile t - 1's slot
    if (t + kStages - 1 < n_tiles) load_tile(t + kStages - 1);
    cp_async_commit();
  };
  // One warp's side of an exchange: v (rows g and g + 8 over this thread's keys) over the quad into
  // red[row][warp], then the warp's arrival on bar.
  auto publish = [&](float (&v)[2], float* red, uint32_t bar, auto op) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      v[hf] = op(v[hf], __shfl_xor_sync(0xffffffffu, v[hf], 1));
      v[hf] = op(v[hf], __shfl_xor_sync(0xffffffffu, v[hf], 2));
    }
    if (lane % 4 == 0) {
      red[g * kRedStride + warp] = v[0];
      red[(g + 8) * kRedStride + warp] = v[1];
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // Row g + 8 hf of red over the warps, in warp order (after the exchange's wait).
  auto gather = [&](const float* red, int hf, float init, auto op) {
    const float4* row = reinterpret_cast<const float4*>(red + (g + 8 * hf) * kRedStride);
    float r = init;
#pragma unroll
    for (int w4 = 0; w4 < kWarps / 4; ++w4) r = op.fold(r, row[w4]);
    return r;
  };
  // S of chunk ch (rows 16 ch + g and + 8, keys key0 + 8 j + 2 (lane % 4) + {0, 1}; -inf past n), its row maxima
  // over this warp's keys into red_m[ch & 1], and this warp's arrival on bar_m.
  auto scores = [&](float (&c)[kNT][4], int ch) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    if (keys_here) {
      // A fragments a0 = (g, c), a1 = (g + 8, c), a2 = (g, c + 8), a3 = (g + 8, c + 8): matrix mi of the
      // ldmatrix is (rows +8 (mi & 1), d +8 (mi >> 1)), so its registers come out in that order (no moves).
      const unsigned char* slot = smem + (ch / 4 % kStages) * S::kTileBytes;
      const uint32_t abase = smem_u32(slot + (ch % 4 * 16 + (mi & 1) * 8 + lr) * S::kPitch + (mi >> 1) * 16);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t af[4];
        ldsm_x4(abase + kk * 32, af);
#pragma unroll
        for (int j = 0; j < kNT; ++j) Mma<T>::run(c[j], af, kf[j][kk][0], kf[j][kk][1]);
      }
    }
    if (keys_cut) {
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + 8 * j + 2 * (lane % 4) + (e & 1) >= n) c[j][e] = -INFINITY;
    }
    float mx[2] = {-INFINITY, -INFINITY};  // raw scores: qk_scale2 > 0 commutes with max
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(c[j][0], c[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(c[j][2], c[j][3]));
    }
    publish(mx, red_m + (ch & 1) * 16 * kRedStride, bar_m, Max());
  };

  float c[kNT][4];
  if (n_chunks > 0) {
    tile_barrier(0);
    scores(c, 0);
  }
  for (int ch = 0; ch < n_chunks; ++ch) {
    // 1. M_i of chunk ch over the warps' maxima.
    mbar_wait(bar_m, ch & 1);
    float nm[2];  // -M_i qk_scale2: finite, every row has key a
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      nm[hf] = -gather(red_m + (ch & 1) * 16 * kRedStride, hf, -INFINITY, Max()) * a.qk_scale2;
    // 2. p = 2^(qk_scale2 s - M_i) into this lane's part of the warp's p buffer (so that the next chunk's S can be
    //    computed before L_i is known), row sums over this warp's keys into red_l[ch & 1], arrival on bar_l.
    float l[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      float4 p4;
      p4.x = ex2_pair<kPolyEvery>(fmaf(c[j][0], a.qk_scale2, nm[0]), 2 * j);
      p4.y = ex2_pair<kPolyEvery>(fmaf(c[j][1], a.qk_scale2, nm[0]), 2 * j);
      p4.z = ex2_pair<kPolyEvery>(fmaf(c[j][2], a.qk_scale2, nm[1]), 2 * j + 1);
      p4.w = ex2_pair<kPolyEvery>(fmaf(c[j][3], a.qk_scale2, nm[1]), 2 * j + 1);
      l[0] += p4.x + p4.y;
      l[1] += p4.z + p4.w;
      pbuf[j * 32 + lane] = p4;
    }
    float* rl = red_l + (ch & 1) * 16 * kRedStride;
    publish(l, rl, bar_l, Add());
    // 3. The next chunk's S while the other warps finish their sums.
    if (ch + 1 < n_chunks) {
      if ((ch + 1) % 4 == 0) tile_barrier(ch + 1);
      scores(c, ch + 1);
    }
    // 4. L_i (the warps' sums in warp order), then the column sums over the chunk's rows of R (w = 0 past them).
    mbar_wait(bar_l, ch & 1);
    float wt[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) wt[hf] = ch * 16 + g + 8 * hf < n_rows ? 1.f / gather(rl, hf, 0.f, Add()) : 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float4 p4 = pbuf[j * 32 + lane];
      acc[j][0] = fmaf(p4.z, wt[1], fmaf(p4.x, wt[0], acc[j][0]));
      acc[j][1] = fmaf(p4.w, wt[1], fmaf(p4.y, wt[0], acc[j][1]));
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending; keep the ring quiet before exit anyway

  // Sum over the 8 row groups g (lanes with equal lane % 4 hold the same keys), store by lanes 0..3.
  const float inv_rows = 1.f / static_cast<float>(n_rows);
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = acc[j][e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      const int key = key0 + 8 * j + 2 * lane + e;
      if (lane < 4 && key < n) a.dst[h * a.dst_sh + sa + key] = v * inv_rows;
    }
}

template <typename T, int D, int kNT, int kPolyEvery>
cudaError_t launch(const Args& a, int num_segments, int heads, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};  // per instantiation: the devices it was configured on
  return sparsevila::launch_segments(salience_fused_kernel<T, D, kNT, kPolyEvery>, configured, Shape<D>::kSmemBytes,
                                     kThreads, a, 1, num_segments, heads, stream);
}

}  // namespace

extern "C" {

int svo_salience_fused_max_seqlen(int head_dim) {
  return sparsevila::dispatch_int<64, 72, 80, 128>(head_dim, 0, [](auto d) {
    return kWarps * 8 * max_key_tiles<decltype(d)::value>();
  });
}

int svo_salience_fused(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* out,
                       float qk_scale2, const int64_t* strides, int num_segments, int max_seqlen, int heads,
                       int num_summary, int poly_every, void* stream) {
  if (num_segments <= 0 || max_seqlen < 0 || num_summary < 0 || max_seqlen > svo_salience_fused_max_seqlen(head_dim))
    return static_cast<int>(cudaErrorInvalidValue);
  Args a{q, k, cu_seqlens, out, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], qk_scale2,
         num_summary};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool wide = max_seqlen > kWarps * 8 * 4;
  return sparsevila::dispatch_salience(dtype, head_dim, poly_every, [&](auto t, auto d, auto p) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value;
    constexpr int P = decltype(p)::value;
    if constexpr (max_key_tiles<D>() == 8) {
      if (wide) return static_cast<int>(launch<T, D, 8, P>(a, num_segments, heads, s));
    }
    return static_cast<int>(launch<T, D, 4, P>(a, num_segments, heads, s));
  });
}

}  // extern "C"
