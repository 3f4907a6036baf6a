// decode_attention, cuda backend (sm_90+): split-KV decode in ONE kernel; the splits of a (b, KV head) row form
// a thread-block cluster and merge through distributed shared memory, so no second (combine) grid is needed
// when a row fits in one cluster (<= 16 CTAs).
//
// Grid (num_chunks, B * Hk), clusters of `cs` consecutive chunks, W warps (8 or 12). Chunk c of row (b, g) covers
// keys [c * chunk, (c + 1) * chunk) ∩ [0, n_b), chunk = ceil(n_b / num_chunks) rounded up to 16 W. Inside a CTA
// each warp streams its own 16-key tiles (tile i of warp w starts at lo + 16 (W i + w)) through a ring of P
// shared-memory slots filled by 1-D bulk copies (TMA), one K row and one V row per lane, each slot completed by
// its own mbarrier: no block-wide barrier in the main loop. Rows are stored with a 16-byte pad so ldmatrix is
// bank-conflict free.
//
// Math per warp, transposed so the G <= 8 query heads of KV head g fill the MMA's n = 8 (two n-tiles for
// G <= 16): S^T = K Q^T (m16n8k16, keys as m), P^T transposed in registers (movmatrix), O^T += V^T P^T. Log2
// domain, qk_scale = scale * log2 e, fp32 statistics, per head h:
//     m' = max(m, qk_scale max_j s_j),  p_j = 2^(qk_scale s_j - m'),  l = l 2^(m - m') + sum_j p_j,
//     o = o 2^(m - m') + sum_j p_j v_j          (the rescale is skipped when no running max grew)
// Then the warps merge in shared memory into the CTA partial (M, L, O unnormalised), which each CTA stores
// straight into its peers' inboxes (column c to the CTA owning c's slice of D / cs columns, (M, L) to all);
// one cluster barrier publishes them and CTA r merges its slice over the cs partials:
//     M* = max_c M_c,  L* = sum_c L_c 2^(M_c - M*),  out = sum_c O_c 2^(M_c - M*) / L*,  lse = (M* + log2 L*) ln 2
// With num_chunks == cs (one cluster per row) that is the final output; with more clusters per row each
// cluster writes (out, lse in log2) to fp32 scratch and a second, small kernel (decode_combine_kernel, the math
// of the Triton backend's combine) merges them.
// n_b == 0 gives out 0, lse -inf. Programmatic dependent launch: griddepcontrol.wait precedes every global
// read, then the dependent grid may launch.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "launch_util.cuh"
#include "mbarrier.cuh"
#include "mma_sync.cuh"
#include "sparsevila_cuda.h"

namespace cg = cooperative_groups;

namespace {

using sparsevila::ldsm_x4;
using sparsevila::Int;
using sparsevila::mbar_expect_tx;
using sparsevila::mbar_init;
using sparsevila::mbar_wait;
using sparsevila::smem_u32;
using sparsevila::Mma;

constexpr int kTile = 16;   // keys per warp tile
constexpr int kRows = 16;   // query heads per KV head, padded (2 MMA n-tiles)
constexpr int kMaxSmem = 227 * 1024;

constexpr int kMaxCluster = 16;

template <int D, int kWarps>
struct Layout {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowBytes = D * 2;
  static constexpr int kPitch = kRowBytes + 16;  // padded smem row: ldmatrix conflict free
  static constexpr int kSlot = 2 * kTile * kPitch;  // one K tile + one V tile
  static constexpr int kQBytes = kRows * kPitch;
  // Cluster merge inbox, written by the peers (so never inside the ring, which may still be streaming):
  // O [cs][16][D / cs] for this CTA's column slice, (M, L) [cs][16][2] for every row.
  static constexpr int kInboxBytes = kRows * D * 4 + kMaxCluster * kRows * 2 * 4;
  static constexpr int kFixed = kQBytes + kInboxBytes + 1024;
  // Ring depth per warp: as many slots as fit next to the rest.
  static constexpr int kStages = (kMaxSmem - kFixed) / (kWarps * kSlot) > 8 ? 8 : (kMaxSmem - kFixed) / (kWarps * kSlot);
  static_assert(kStages >= 1, "shared memory");
  static constexpr int kRingBytes = kWarps * kStages * kSlot;
  // After the main loop the ring holds the per-warp partials.
  static constexpr int kWP = D + 4;  // warp-partial row pitch (floats): conflict-free scattered stores
  static_assert(kWarps * kRows * (kWP + 2) * 4 <= kRingBytes, "warp partials must fit in the ring");
  static constexpr int kQOffset = kRingBytes;
  static constexpr int kInboxOffset = kQOffset + kQBytes;
  static constexpr int kBarOffset = kInboxOffset + kInboxBytes;
  static constexpr int kSmemBytes = kBarOffset + kWarps * kStages * 8;
  static_assert(kSmemBytes <= kMaxSmem, "shared memory");
};

__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const int* lengths;
  void* out;
  float* lse;
  float* po;  // [B, Hq, num_clusters, D] normalised partial outputs (num_clusters > 1 only)
  float* pl;  // [B, Hq, num_clusters] partial lse, log2 domain
  float qk_scale;
  int64_t q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, l_sb, l_sh;
  int hk, group, hq, num_chunks, cluster;
  // Diagnostics (bench/decode_timeline.py): when non-null, thread 0 of each CTA records %clock64 at each
  // phase boundary, kTimelineStamps per CTA, plus %globaltimer at entry and exit.
  long long* timeline;
};

constexpr int kTimelineStamps = 8;

__device__ __forceinline__ void stamp(const Args& a, int i) {
  if (a.timeline != nullptr && threadIdx.x == 0) {
    long long* t = a.timeline + ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * (kTimelineStamps + 2);
    t[i] = clock64();
    if (i == 0 || i == kTimelineStamps - 1) {
      long long g;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
      t[kTimelineStamps + (i != 0)] = g;
    }
  }
}

template <typename T, int D, int kWarps, int NT>
__global__ void __launch_bounds__(32 * kWarps, 1) decode_cluster_kernel(const __grid_constant__ Args a) {
  using L = Layout<D, kWarps>;
  constexpr int kThreads = L::kThreads;
  constexpr int P = L::kStages;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  unsigned char* qs = smem + L::kQOffset;
  float* inbox_o = reinterpret_cast<float*>(smem + L::kInboxOffset);
  float* inbox_ml = inbox_o + kRows * D;
  const uint32_t bars = smem_u32(smem + L::kBarOffset);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk_id = blockIdx.x;
  const int row = blockIdx.y;  // b * Hk + g
  const int b = row / a.hk, g = row % a.hk;

  stamp(a, 0);
  if (lane == 0) {
    for (int s = 0; s < P; ++s) mbar_init(bars + (warp * P + s) * 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Peers write into this CTA's inbox only after every CTA of the cluster has started (waited on below).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  // Everything above touches no global memory; from here on the predecessor's writes must be visible.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  stamp(a, 1);

  const int n = a.lengths[b];
  int chunk = (n + a.num_chunks - 1) / a.num_chunks;
  chunk = (chunk + kWarps * kTile - 1) / (kWarps * kTile) * (kWarps * kTile);
  const int lo = min(chunk_id * chunk, n);
  const int hi = min(lo + chunk, n);

  // q tile [16, D] into shared memory (rows >= G zero).
  const T* qg = static_cast<const T*>(a.q) + b * a.q_sb + (int64_t)g * a.group * a.q_sh;
  for (int e = threadIdx.x; e < kRows * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c8 = e % (D / 8);
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < a.group) val = *reinterpret_cast<const uint4*>(qg + r * a.q_sh + c8 * 8);
    *reinterpret_cast<uint4*>(qs + r * L::kPitch + c8 * 16) = val;
  }

  const T* kg = static_cast<const T*>(a.k) + b * a.k_sb + g * a.k_sh;
  const T* vg = static_cast<const T*>(a.v) + b * a.v_sb + g * a.v_sh;
  const int span = hi - lo;
  const int my_tiles = span > warp * kTile ? (span - warp * kTile + kWarps * kTile - 1) / (kWarps * kTile) : 0;
  unsigned char* my_ring = ring + warp * P * L::kSlot;

  // Tile i of this warp into slot i % P: lane r < 16 copies K row r, lane 16 + r copies V row r. V rows past
  // `hi` are zeroed (p = 0 there, but 0 * garbage could be NaN); K rows past `hi` are masked to -inf.
  auto issue = [&](int i) {
    const int t0 = lo + (i * kWarps + warp) * kTile;
    const int valid = min(kTile, hi - t0);
    const int s = i % P;
    const uint32_t bar = bars + (warp * P + s) * 8;
    unsigned char* slot = my_ring + s * L::kSlot;
    if (lane == 0) mbar_expect_tx(bar, valid * 2 * L::kRowBytes);
    __syncwarp();
    const int r = lane % kTile;
    if (r < valid) {
      if (lane < kTile)
        bulk_g2s(smem_u32(slot + r * L::kPitch), kg + (int64_t)(t0 + r) * a.k_sn, L::kRowBytes, bar);
      else
        bulk_g2s(smem_u32(slot + (kTile + r) * L::kPitch), vg + (int64_t)(t0 + r) * a.v_sn, L::kRowBytes, bar);
    } else if (lane >= kTile) {
      uint4* dst = reinterpret_cast<uint4*>(slot + (kTile + r) * L::kPitch);
      for (int c = 0; c < L::kRowBytes / 16; ++c) dst[c] = make_uint4(0, 0, 0, 0);
    }
  };
  for (int i = 0; i < min(P, my_tiles); ++i) issue(i);
  stamp(a, 2);

  __syncthreads();  // q in shared memory
  // Transposed products, so the G <= 8 NT heads fill the MMA's n = 8 instead of padding m = 16:
  //   S^T [16 keys x 8 heads] = K [keys x d] Q^T,   O^T [d x 8 heads] += V^T [d x keys] P^T.
  // Q^T is the B operand (k = d, n = head): b0 = q[head lane/4][d (lane%4)*2 + {0,1}], b1 = d + 8.
  uint32_t qb[NT][D / 16][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const unsigned char* qrow = qs + (nt * 8 + lane / 4) * L::kPitch + (kk * 16 + (lane % 4) * 2) * 2;
      qb[nt][kk][0] = *reinterpret_cast<const uint32_t*>(qrow);
      qb[nt][kk][1] = *reinterpret_cast<const uint32_t*>(qrow + 16);
    }
  // acc[nt][dm]: the m16n8 tile of O^T with d = dm*16 + lane/4 (+8 for c2, c3), head nt*8 + (lane%4)*2 (+1 for
  // c1, c3). m, l: running max (log2 domain, scaled) and this lane's partial sum for heads (lane%4)*2 + {0, 1}.
  float acc[NT][D / 16][4];
  float m[NT][2], l[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    m[nt][0] = m[nt][1] = -INFINITY;
    l[nt][0] = l[nt][1] = 0.f;
#pragma unroll
    for (int dm = 0; dm < D / 16; ++dm) acc[nt][dm][0] = acc[nt][dm][1] = acc[nt][dm][2] = acc[nt][dm][3] = 0.f;
  }
  const int mi = lane / 8, lr = lane % 8;  // ldmatrix: this lane addresses row lr of 8x8 matrix mi

  for (int i = 0; i < my_tiles; ++i) {
    const int s = i % P;
    mbar_wait(bars + (warp * P + s) * 8, (i / P) & 1);
    if (i == 0) stamp(a, 3);
    unsigned char* slot = my_ring + s * L::kSlot;
    const int t0 = lo + (i * kWarps + warp) * kTile;

    // S^T: A = K tile (rows = keys), c0/c1 = key lane/4, c2/c3 = key lane/4 + 8. Two MMA chains over d.
    float st[NT][4];
    {
      const uint32_t kbase = smem_u32(slot + (lr + (mi & 1) * 8) * L::kPitch + (mi >> 1) * 16);
      uint32_t kf[D / 16][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(kbase + kk * 32, kf[kk]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float x[4] = {0.f, 0.f, 0.f, 0.f}, y[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
          Mma<T>::run(x, kf[kk], qb[nt][kk][0], qb[nt][kk][1]);
          Mma<T>::run(y, kf[kk + 1], qb[nt][kk + 1][0], qb[nt][kk + 1][1]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = x[e] + y[e];
      }
    }
    if (t0 + kTile > hi) {  // only a tile that crosses `hi` is masked
      const bool ok0 = t0 + lane / 4 < hi, ok1 = t0 + lane / 4 + 8 < hi;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (!ok0) st[nt][0] = st[nt][1] = -INFINITY;
        if (!ok1) st[nt][2] = st[nt][3] = -INFINITY;
      }
    }
    // Online softmax per head over the tile's 16 keys, on raw scores (scale > 0 commutes with max): in-lane
    // over the two key rows, then over the 8 lanes that share lane % 4.
    float mx[NT][2];
    bool grow = false;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mx[nt][0] = fmaxf(st[nt][0], st[nt][2]);
      mx[nt][1] = fmaxf(st[nt][1], st[nt][3]);
    }
#pragma unroll
    for (int off = 4; off < 32; off *= 2)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mx[nt][0] = fmaxf(mx[nt][0], __shfl_xor_sync(0xffffffff, mx[nt][0], off));
        mx[nt][1] = fmaxf(mx[nt][1], __shfl_xor_sync(0xffffffff, mx[nt][1], off));
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        mx[nt][j] = fmaxf(m[nt][j], mx[nt][j] * a.qk_scale);  // the new max; finite: >= 1 valid key
        grow |= mx[nt][j] > m[nt][j];
      }
    if (__any_sync(0xffffffff, grow)) {  // rescale only when some running max grew (rare after a few tiles)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float al0 = exp2f(m[nt][0] - mx[nt][0]), al1 = exp2f(m[nt][1] - mx[nt][1]);
        m[nt][0] = mx[nt][0];
        m[nt][1] = mx[nt][1];
        l[nt][0] *= al0;
        l[nt][1] *= al1;
#pragma unroll
        for (int dm = 0; dm < D / 16; ++dm) {
          acc[nt][dm][0] *= al0; acc[nt][dm][1] *= al1;
          acc[nt][dm][2] *= al0; acc[nt][dm][3] *= al1;
        }
      }
    }
    // P^T, then B fragments of O^T += V^T P^T (k = key, n = head) by an in-register 8x8 transpose.
    uint32_t pb[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        st[nt][e] = exp2f(fmaf(st[nt][e], a.qk_scale, -m[nt][e & 1]));
        l[nt][e & 1] += st[nt][e];
      }
      pb[nt][0] = movmatrix_t(Mma<T>::pack(st[nt][0], st[nt][1]));  // keys 0-7
      pb[nt][1] = movmatrix_t(Mma<T>::pack(st[nt][2], st[nt][3]));  // keys 8-15
    }
    {  // A = V^T: V rows are keys, so the transposed ldmatrix yields (d, key) fragments.
      const uint32_t vbase = smem_u32(slot + (kTile + lr + (mi >> 1) * 8) * L::kPitch + (mi & 1) * 16);
      uint32_t vf[D / 16][4];
#pragma unroll
      for (int dm = 0; dm < D / 16; ++dm) ldsm_x4_t(vbase + dm * 32, vf[dm]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int dm = 0; dm < D / 16; ++dm) Mma<T>::run(acc[nt][dm], vf[dm], pb[nt][0], pb[nt][1]);
    }
    __syncwarp();  // every lane's reads of this slot are done before it is refilled
    if (i + P < my_tiles) issue(i + P);
  }

  // Merge the warps in shared memory (the ring is idle: every copy issued was waited for).
  stamp(a, 4);
  __syncthreads();
  float* wpart = reinterpret_cast<float*>(ring);  // [warps][16 heads][kWP] unnormalised O
  float* wml = wpart + kWarps * kRows * L::kWP;    // [warps][16 heads][2] (m, l)
#pragma unroll
  for (int off = 4; off < 32; off *= 2)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      l[nt][0] += __shfl_xor_sync(0xffffffff, l[nt][0], off);
      l[nt][1] += __shfl_xor_sync(0xffffffff, l[nt][1], off);
    }
  {
    float* w = wpart + warp * kRows * L::kWP;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int h = nt * 8 + (lane % 4) * 2;
#pragma unroll
      for (int dm = 0; dm < D / 16; ++dm) {
        const int d = dm * 16 + lane / 4;
        w[h * L::kWP + d] = acc[nt][dm][0];
        w[(h + 1) * L::kWP + d] = acc[nt][dm][1];
        w[h * L::kWP + d + 8] = acc[nt][dm][2];
        w[(h + 1) * L::kWP + d + 8] = acc[nt][dm][3];
      }
      if (lane < 4) {
        wml[(warp * kRows + h) * 2] = m[nt][0];
        wml[(warp * kRows + h) * 2 + 1] = l[nt][0];
        wml[(warp * kRows + h + 1) * 2] = m[nt][1];
        wml[(warp * kRows + h + 1) * 2 + 1] = l[nt][1];
      }
    }
  }
  __syncthreads();

  // The CTA partial (M, L, O unnormalised) goes straight into the inboxes of the cluster: column c to the
  // CTA that owns it (c / (D / cs)), (M, L) of each row to every CTA. Remote stores do not stall; the
  // cluster barrier below publishes them.
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cs = a.cluster;
  const int cols = D / cs;
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every peer has started
  for (int e = threadIdx.x; e < a.group * D; e += kThreads) {
    const int r = e / D, c = e % D;
    float mw[kWarps], mmax = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mmax = fmaxf(mmax, mw[w] = wml[(w * kRows + r) * 2]);
    float o = 0.f, l = 0.f;
    if (mmax != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(mw[w] - mmax);  // 0 for a warp that saw no key (m = -inf)
        o += f * wpart[(w * kRows + r) * L::kWP + c];
        l += f * wml[(w * kRows + r) * 2 + 1];
      }
    }
    cluster.map_shared_rank(inbox_o, c / cols)[(rank * kRows + r) * cols + c % cols] = o;
    if (c < cs) {  // thread of column c sends row r's (M, L) to CTA c
      float* ml = cluster.map_shared_rank(inbox_ml, c) + (rank * kRows + r) * 2;
      ml[0] = mmax;
      ml[1] = l;
    }
  }
  stamp(a, 5);
  cluster.sync();  // release the remote stores / acquire the peers'
  stamp(a, 6);

  // Merge this CTA's column slice [rank * cols, (rank + 1) * cols) over the cs partials:
  //   M* = max_p M_p,  L* = sum_p L_p 2^(M_p - M*),  out = sum_p O_p 2^(M_p - M*) / L*.
  const int cluster_id = chunk_id / cs, num_clusters = a.num_chunks / cs;
  for (int e = threadIdx.x; e < a.group * cols; e += kThreads) {
    const int r = e / cols, cc = e % cols, c = rank * cols + cc;
    float mmax = -INFINITY;
#pragma unroll
    for (int p = 0; p < kMaxCluster; ++p)
      if (p < cs) mmax = fmaxf(mmax, inbox_ml[(p * kRows + r) * 2]);
    float o = 0.f, l = 0.f;
    if (mmax != -INFINITY) {
#pragma unroll
      for (int p = 0; p < kMaxCluster; ++p)
        if (p < cs) {
          const float f = exp2f(inbox_ml[(p * kRows + r) * 2] - mmax);
          o += f * inbox_o[(p * kRows + r) * cols + cc];
          l += f * inbox_ml[(p * kRows + r) * 2 + 1];
        }
    }
    const int h = g * a.group + r;
    const float out = l > 0.f ? o / l : 0.f;
    const float lse2 = l > 0.f ? mmax + log2f(l) : -INFINITY;
    if (num_clusters == 1) {
      static_cast<T*>(a.out)[b * a.o_sb + h * a.o_sh + c] = static_cast<T>(out);
      if (c == 0) a.lse[b * a.l_sb + h * a.l_sh] = lse2 * 0.6931471805599453f;
    } else {
      const int64_t bh = (int64_t)b * a.hq + h;
      a.po[(bh * num_clusters + cluster_id) * D + c] = out;
      if (c == 0) a.pl[bh * num_clusters + cluster_id] = lse2;
    }
  }
  stamp(a, 7);
}

template <typename T, int D, int W, int NT>
cudaError_t launch(const Args& a, int batch, int pdl, cudaStream_t stream) {
  using L = Layout<D, W>;
  auto kernel = decode_cluster_kernel<T, D, W, NT>;
  static std::atomic<uint64_t> configured{0};  // per instantiation: the devices it was configured on
  const cudaError_t set = sparsevila::once_per_device(configured, [&] {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes);
    return e != cudaSuccess ? e : cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  });
  if (set != cudaSuccess) return set;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(a.num_chunks, batch * a.hk, 1);
  cfg.blockDim = dim3(L::kThreads, 1, 1);
  cfg.dynamicSmemBytes = L::kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = a.cluster;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = pdl ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

// Several clusters per row: merge their partials po [B, Hq, S, D] (normalised) and pl [B, Hq, S] (lse, log2).
// Block (b * Hq + h, 32-column slice); warp w sums the clusters s = w (mod 4) and the warps add up in shared
// memory. As in the Triton combine: M = max_s pl_s (0 when every cluster is empty), w_s = 2^(pl_s - M),
//   out = sum_s w_s po_s / max(sum_s w_s, 1e-30),  lse = (M + log2 sum_s w_s) ln 2  (-inf when all are empty).
constexpr int kCombineCols = 32;
constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kCombineWarps) decode_combine_kernel(const __grid_constant__ Args a,
                                                                             int num_clusters, int head_dim) {
  asm volatile("griddepcontrol.wait;" ::: "memory");  // PDL: the cluster grid's partials are visible after this
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  __shared__ float part[kCombineWarps][kCombineCols];
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(bh / a.hq), h = static_cast<int>(bh % a.hq);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.y * kCombineCols + lane;
  const float* pl = a.pl + bh * num_clusters;
  float m = -INFINITY;
  for (int s = 0; s < num_clusters; ++s) m = fmaxf(m, pl[s]);
  const float m_safe = m == -INFINITY ? 0.f : m;
  float denom = 0.f, o = 0.f;
  for (int s = 0; s < num_clusters; ++s) denom += exp2f(pl[s] - m_safe);
  denom = fmaxf(denom, 1e-30f);
  if (c < head_dim)
    for (int s = warp; s < num_clusters; s += kCombineWarps) {
      const float w = exp2f(pl[s] - m_safe);
      if (w > 0.f) o += w * a.po[(bh * num_clusters + s) * head_dim + c];
    }
  part[warp][lane] = o;
  __syncthreads();
  if (warp == 0 && c < head_dim) {
    for (int w = 1; w < kCombineWarps; ++w) o += part[w][lane];
    static_cast<T*>(a.out)[b * a.o_sb + h * a.o_sh + c] = static_cast<T>(o / denom);
    if (c == 0)
      a.lse[b * a.l_sb + h * a.l_sh] = m == -INFINITY ? -INFINITY : (m_safe + log2f(denom)) * 0.6931471805599453f;
  }
}

template <typename T>
cudaError_t launch_combine(const Args& a, int batch, int head_dim, int pdl, cudaStream_t stream) {
  const dim3 grid(batch * a.hq, (head_dim + kCombineCols - 1) / kCombineCols);
  return sparsevila::launch_pdl(decode_combine_kernel<T>, grid, dim3(32 * kCombineWarps), 0, stream, pdl, a,
                                a.num_chunks / a.cluster, head_dim);
}

template <typename T, int D, int W, int NT>
int max_active_clusters(int cluster) {
  using L = Layout<D, W>;
  auto kernel = decode_cluster_kernel<T, D, W, NT>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
    return -1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cluster, 1, 1);
  cfg.blockDim = dim3(L::kThreads, 1, 1);
  cfg.dynamicSmemBytes = L::kSmemBytes;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) return -1;
  return n;
}

// Calls fn(Tag<T>, Int<D>, Int<W>, Int<NT>) for the compiled instantiation matching the runtime arguments;
// `fallback` when there is none.
template <typename Fn>
int dispatch(int dtype, int head_dim, int warps, int group, int fallback, Fn&& fn) {
  auto by_nt = [&](auto t, auto d, auto w) -> int {
    if (group <= 8) return fn(t, d, w, Int<1>{});
    if (group <= 16) return fn(t, d, w, Int<2>{});
    return fallback;
  };
  return sparsevila::dispatch_dtype(dtype, fallback, [&](auto t) {
    return sparsevila::dispatch_int<64, 128>(head_dim, fallback, [&](auto d) {
      return sparsevila::dispatch_int<8, 12>(warps, fallback, [&](auto w) { return by_nt(t, d, w); });
    });
  });
}

}  // namespace

extern "C" {

int svo_decode_cluster(int dtype, int head_dim, const void* q, const void* k, const void* v, const int* lengths,
                       void* out, float* lse, float* po, float* pl, float qk_scale, const int64_t* strides,
                       long long* timeline,
                       int batch, int hk, int group, int hq, int num_chunks, int cluster, int warps, int pdl, void* stream) {
  Args a{q, k, v, lengths, out, lse, po, pl, qk_scale,
         strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6], strides[7],
         strides[8], strides[9], strides[10], strides[11], hk, group, hq, num_chunks, cluster, timeline};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, head_dim, warps, group, cudaErrorInvalidValue, [&](auto t, auto d, auto w, auto nt) {
    using T = typename decltype(t)::type;
    cudaError_t e = launch<T, decltype(d)::value, decltype(w)::value, decltype(nt)::value>(a, batch, pdl, s);
    if (e == cudaSuccess && num_chunks > cluster) e = launch_combine<T>(a, batch, head_dim, pdl, s);
    return static_cast<int>(e);
  });
}

int svo_decode_max_active_clusters(int dtype, int head_dim, int cluster, int warps, int group) {
  return dispatch(dtype, head_dim, warps, group, -1, [&](auto t, auto d, auto w, auto nt) {
    return max_active_clusters<typename decltype(t)::type, decltype(d)::value, decltype(w)::value,
                               decltype(nt)::value>(cluster);
  });
}

const char* svo_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
