// visual_salience, cuda backend, Hopper kernels (sm_90a): the two passes of salience.cu (same math, arguments and
// outputs; see its file comment) with TMA tile copies, wgmma tensor cores and warp specialization, so that each
// tile's QK^T runs on the tensor cores while the previous tile's exp2s run on MUFU and the FMA pipe.
//
// The grid is persistent: one CTA per SM, each taking the work items blockIdx.x, blockIdx.x + gridDim.x, ... in
// turn, a work item being kRows resident rows of one head in one segment (below). Items flow through the CTA
// without a break: the producer loads the next item's resident tile into the second of two buffers and streams its
// tiles into the same ring while the consumers finish the current one, so the per-CTA costs (barrier setup, the
// first tiles' latency, the last tile's wait) are paid once per SM instead of once per item (measured at SigLIP's
// 729-token segments: -18 % per pass; bench/NOTES.md).
//
// A CTA is 1 + C warpgroups (Tiles<C, N>: C = 2 or 4). Warpgroup 0 produces: one thread decodes the items and
// issues every TMA copy (and in pass 2 with C = 4 its second warp prepares each tile's lse, below), the others
// exit after handing their registers to the consumers (setmaxnreg). Warpgroups 1..C consume: each owns 64 of the
// item's kRows = 64 C "resident" rows (pass 1: query rows of R; pass 2: keys of the segment), a wgmma A operand in
// shared memory loaded once per item. The segment's other operand streams through a ring of kStages N-row tiles
// (N = 128 or 64; pass 1: the keys; pass 2: the rows of R and their lse). Per tile a consumer issues S = A B^T
// (m64nN, k = D padded to 16; asynchronous; in pass 2 with C = 4 and D <= 80, A from registers,
// Tiles::kRegisterA), then spends the time it runs on the previous tile's S:
//   pass 1: running max and sum per row over the thread's columns (log2 units), one quad merge at the end;
//   pass 2: p = 2^(qk_scale2 s - lse_scale lse[col]) summed per key row, one quad sum at the end. With C = 4 the
//           producer's second warp writes nl = -lse_scale lse (-inf past the segment) over the tile's lse in shared
//           memory, so a consumer spends one FFMA, one MUFU and one FADD per score and one 8-byte load per column
//           pair (C = 2 computes nl and the mask itself: the same change measured 6 % slower there, NOTES.md).
// Two S tiles are live per thread (2 x N / 2 fp32), hence setmaxnreg 240 (C = 2) or 112 (C = 4) for the
// consumers, 24 or 32 for the producer. C = 4, N = 64 (more consumer warps per scheduler to hide the exp chains'
// latency) is the host's default but where C = 2, N = 128 pads fewer resident rows (cuda_salience._default;
// bench/NOTES.md).
//
// Shared memory holds an R-row tile (R = kRows resident, N streamed) of head dim D as TMA writes it: columns 0..63
// (and 64..127 at D = 128) in the 128-byte swizzle (128 B per row, 1024-byte atoms of 8 rows), and for D = 72 / 80
// columns 64..79 in the 32-byte swizzle (32 B per row; columns past D zero-filled by TMA). The MMA k extent is thus
// 80 for D = 72 / 80: no more padding than the 16-column wgmma k step. Rows past the tensor's end arrive as zeros;
// streamed rows past the segment's end, only ever in its last tile, are masked (pass 1: score -inf; pass 2: its lse
// term -inf, p = 0). Resident rows past the segment are computed and not stored.
// Barriers: full[s] (the producer's expect_tx; the copies' bytes complete it), empty[s] (one arrive per consumer
// warp once its wgmma has read the slot and its lse loads are done), res_full[b] (resident buffer b's tile and
// Item), res_empty[b] (one arrive per thread that read the Item, at the end of its item: an arrive releases only
// the arriving thread's own reads), and with nl (pass 2, C = 4) ready[s] (the 32 lanes of the warp that turned the
// slot's lse into nl).
#include <cuda.h>  // CUtensorMap (types only: the encoder is reached through the runtime's driver entry point)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <math.h>
#include <stdint.h>

#include <atomic>

#include "exp2.cuh"
#include "launch_util.cuh"
#include "salience_launch.cuh"
#include "mbarrier.cuh"
#include "sparsevila_cuda.h"
#include "wgmma.cuh"

namespace {

using sparsevila::ex2_mufu;
using sparsevila::ex2_pair;
using sparsevila::fence_operand;
using sparsevila::mbar_arrive;
using sparsevila::mbar_expect_tx;
using sparsevila::mbar_init;
using sparsevila::mbar_wait;
using sparsevila::smem_u32;
using sparsevila::Swizzle;
using sparsevila::wgmma_desc;

constexpr int kPassLse = 1;
constexpr int kPassColsum = 2;

// C consumer warpgroups of 64 resident rows each, N-row streamed tiles.
template <int C, int N>
struct Tiles {
  static_assert((C == 2 && N == 128) || (C == 4 && N == 64), "tile shapes: 2 x 128 or 4 x 64");
  static constexpr int kThreads = 128 * (1 + C);  // + the producer warpgroup
  static constexpr int kRows = 64 * C;            // resident rows per CTA (one TMA box)
  static constexpr int kScores = N / 2;           // fp32 scores per thread and tile (wgmma m64nN)
  // A TMA box must start 16-byte aligned in its innermost dimension: the lse of a tile's N rows comes as a box of
  // N + 4 floats from the row rounded down to a multiple of 4.
  static constexpr int kLseBox = N + 4;
  // The register file of one CTA (65536 / kThreads each at launch, a multiple of 8, at most 168): the producer
  // keeps kProducerRegs, the consumers get the rest (C = 2: 24 + 2 x 240 = 3 x 168; C = 4: 32 + 4 x 112 = 5 x 96,
  // where 24 would leave the consumers no more and spill the producer's item loop).
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8 > 168 ? 168 : 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegs = C == 4 ? 32 : 24;
  static constexpr int kFree = (kThreads * kLaunchRegs - 128 * kProducerRegs) / (128 * C) / 8 * 8;
  static constexpr int kConsumerRegs = kFree > 240 ? 240 : kFree;
  // Pass 2 takes nl from the producer's second warp (file comment): measured faster with four consumer warps per
  // scheduler (H200, 729-32768 tokens: 6-10 %), slower with two (32k: 6 %).
  static constexpr bool kNlByProducer = C == 4;
  // Pass 2 with C = 4 reads the wgmma's A operand (the consumer's 64 resident keys) from registers, loaded once
  // (D <= 80: 16-20 registers; at D = 128 the 32 it needs spill): each k step then reads only B from shared memory,
  // where the SS form's 4 KB per m64n64k16 step plus the nl loads kept it busy 60 % (ncu). Measured (H200, 32k /
  // 1024 / 729 tokens): pass 2 -14 / -11 / -9 %; pass 1 +3 % (so it keeps SS); C = 2, N = 128 unchanged.
  template <int kPass, int D>
  static constexpr bool kRegisterA = kPass == kPassColsum && C == 4 && D <= 80;
};

template <int D, int C, int N>
struct Layout {
  static_assert(D == 64 || D == 72 || D == 80 || D == 128, "head dim");
  // Slots of the streamed ring: 8 (measured against 4 on the H200: column sums -3 to -4 % at 729-token segments,
  // -1 % at 1024, nothing at 32k; bench/NOTES.md), 4 at D = 128, where shared memory holds no more.
  static constexpr int kStages = D == 128 ? 4 : 8;
  static constexpr int kMain = D / 64;                  // 128B-swizzled regions of 64 columns
  static constexpr bool kTail = D % 64 != 0;            // columns 64..79 in a 32B-swizzled region
  static constexpr int kKSteps = 4 * kMain + (kTail ? 1 : 0);
  template <int R>
  static constexpr int tile_bytes() {  // R rows: kMain regions of R x 128 bytes, then the tail's R x 32
    return kMain * R * 128 + (kTail ? R * 32 : 0);
  }
  static constexpr int kResBytes = tile_bytes<Tiles<C, N>::kRows>();  // the resident tile
  static constexpr int kTileBytes = tile_bytes<N>();                  // a streamed tile
  static constexpr int kLseBytes = Tiles<C, N>::kLseBox * 4;
  static constexpr int kStageBytes = (kTileBytes + kLseBytes + 1023) / 1024 * 1024;  // stages stay 1024-aligned
  // full, empty, ready per stage; res_full, res_empty per resident buffer; then the two buffers' Item records
  static constexpr int kBarBytes = 8 * (3 * kStages + 4) + 2 * 32;
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + 2 * kResBytes + kStages * kStageBytes + kBarBytes;
  static_assert(kResBytes % 1024 == 0 && kTileBytes % 1024 == 0 && kSmemBytes <= 227 * 1024, "shared memory");
};

struct Args {
  CUtensorMap q_main, q_tail, k_main, k_tail;  // q, k [T, H, D]: boxes of 64 / 16 columns x R rows x 1 head
                                               // (R: the resident kRows or the streamed N, by pass)
  CUtensorMap lse;                             // pass 2: lse [H, T] fp32, boxes of kLseBox rows x 1 head
  const int* cu;                               // cu_seqlens, stride cu_s
  float* dst;                                  // pass 1: lse2 [H, T]; pass 2: salience [H, T]; row stride dst_sh
  int64_t cu_s, dst_sh;
  float qk_scale2;  // scale * log2 e
  float lse_scale;  // 1 (log2 lse) or log2 e (natural lse)
  int num_summary;
  int nblk;                      // work items (resident tiles of kRows rows) per segment
  int num_segments, heads;       // work item i: head i / (nblk S), segment (i / nblk) % S, block i % nblk
  int q_head_inner, k_head_inner;  // 1: the map's dimensions are (d, head, row); 0: (d, row, head) (qk_map)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// A box of ``map`` at coordinates (c0, c1, c2) into shared ``dst``; its bytes complete on ``bar``.
__device__ __forceinline__ void tma_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Rows [row, row + R) of head h, every column region of Layout<D, ...>, into the R-row tile at ``dst`` (the maps'
// boxes are R rows).
template <int D, int R>
__device__ __forceinline__ void load_tile(uint32_t dst, const CUtensorMap* main, const CUtensorMap* tail, int row,
                                          int h, int head_inner, uint32_t bar) {
  constexpr int kMain = D / 64;
  const int c1 = head_inner ? h : row, c2 = head_inner ? row : h;
#pragma unroll
  for (int p = 0; p < kMain; ++p) tma_3d(dst + p * R * 128, main, 64 * p, c1, c2, bar);
  if constexpr (D % 64 != 0) tma_3d(dst + kMain * R * 128, tail, 64, c1, c2, bar);
}

// Descriptor of k step kk (16 columns) of the 64 rows starting at row ``row0`` of the R-row tile at ``tile``.
template <int D, int R>
__device__ __forceinline__ uint64_t tile_desc(uint32_t tile, int kk, int row0) {
  constexpr int kMain = D / 64;
  if (kk < 4 * kMain) return wgmma_desc(tile + (kk / 4) * R * 128 + row0 * 128 + (kk % 4) * 32, Swizzle::k128B, 128);
  return wgmma_desc(tile + kMain * R * 128 + row0 * 32, Swizzle::k32B, 32);
}

// The wgmma A fragments of k step kk (16 columns) of the 16 rows starting at ``row0`` of the R-row tile at ``tile``
// (ldmatrix.x4: lanes 8 m .. 8 m + 7 address the rows (m & 1) 8 + 0..7, the 8-column chunk m >> 1 of the step; a
// 16-byte chunk j of row r sits at j ^ (r & 7) in the 128B swizzle, at j ^ ((r >> 2) & 1) in the 32B one).
template <int D, int R>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t tile, int kk, int row0, int lane) {
  constexpr int kMain = D / 64;
  const int m = lane / 8, r = row0 + (m & 1) * 8 + lane % 8;
  const uint32_t addr = kk < 4 * kMain
      ? tile + (kk / 4) * R * 128 + r * 128 + (((2 * (kk % 4) + (m >> 1)) ^ (r & 7)) * 16)
      : tile + kMain * R * 128 + r * 32 + (((m >> 1) ^ ((r >> 2) & 1)) * 16);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

#endif

// One work item of a pass: the resident rows [res0, res0 + kRows) of head h in the segment starting at token sa.
// The producer thread decodes each item once and hands it to the other warps in shared memory with the resident
// tile (an Item per resident buffer, published by the arrive on res_full). n_str == 0: no more items.
struct Item {
  int sa;       // the segment's first token
  int n_str;    // streamed rows (pass 1: the segment's keys; pass 2: its rows of R), >= 1
  int res0;     // first resident row (a token index)
  int res_end;  // resident rows at or past it are computed, not stored
  int count;    // pass 2: the rows of R (the mean's divisor)
  int h;
};

template <typename T, int D, int kPass, int kPolyEvery, int C, int N>
__global__ void __launch_bounds__(Tiles<C, N>::kThreads, 1) salience_wgmma_kernel(const __grid_constant__ Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<D, C, N>;
  constexpr int kStages = L::kStages;
  constexpr int kRows = Tiles<C, N>::kRows, kS = Tiles<C, N>::kScores;
  constexpr bool kNl = kPass == kPassColsum && Tiles<C, N>::kNlByProducer;
  extern __shared__ unsigned char smem_raw[];

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t res0_buf = (raw + 1023) & ~1023u;  // two resident tiles; then the stages; then the barriers
  const uint32_t stage0 = res0_buf + 2 * L::kResBytes;
  const uint32_t bars = stage0 + kStages * L::kStageBytes;
  auto res_buf = [&](int b) { return res0_buf + b * L::kResBytes; };
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (kStages + s); };
  auto ready = [&](int s) { return bars + 8 * (2 * kStages + s); };
  auto res_full = [&](int b) { return bars + 8 * (3 * kStages + b); };
  auto res_empty = [&](int b) { return bars + 8 * (3 * kStages + 2 + b); };
  Item* items = reinterpret_cast<Item*>(smem_raw + (bars - raw) + 8 * (3 * kStages + 4));
  // Pass 2: slot s's lse box (with kNl: its first N floats overwritten by nl).
  auto nl_of = [&](int s) {
    return reinterpret_cast<float*>(smem_raw + (stage0 - raw) + s * L::kStageBytes + L::kTileBytes);
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 4 * C);
      if (kNl) mbar_init(ready(s), 32);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(res_full(b), 1);
      mbar_init(res_empty(b), 128 * C + (kNl ? 32 : 0));  // every thread that reads the buffer's Item
    }
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  // The CTA's k-th nonempty item sits in resident buffer k & 1, published as phase k >> 1 of res_full[k & 1] (the
  // producer refills a buffer only after every thread that reads it released it, so no barrier runs two phases
  // ahead of a waiter). Streamed tiles run through the ring without a break between items: the CTA's g-th tile in
  // slot g % kStages, phase g / kStages.
  auto wait_item = [&](int k) {
    mbar_wait(res_full(k & 1), (k >> 1) & 1);
    return items[k & 1];
  };

  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(Tiles<C, N>::kProducerRegs));
    if (threadIdx.x == 0) {
      const CUtensorMap *rm = kPass == kPassLse ? &a.q_main : &a.k_main, *rt = kPass == kPassLse ? &a.q_tail : &a.k_tail;
      const CUtensorMap *sm = kPass == kPassLse ? &a.k_main : &a.q_main, *st = kPass == kPassLse ? &a.k_tail : &a.q_tail;
      const int r_hi = kPass == kPassLse ? a.q_head_inner : a.k_head_inner;
      const int s_hi = kPass == kPassLse ? a.k_head_inner : a.q_head_inner;
      const int64_t per_head = static_cast<int64_t>(a.nblk) * a.num_segments, n_items = per_head * a.heads;
      int g = 0, k = 0;
      auto claim = [&](int b) {  // resident buffer b, once every reader released its previous item
        if (k >= 2) mbar_wait(res_empty(b), ((k >> 1) - 1) & 1);
      };
      for (int64_t i = blockIdx.x; i < n_items; i += gridDim.x) {
        const int h = static_cast<int>(i / per_head), seg = static_cast<int>(i % per_head) / a.nblk;
        const int blk = static_cast<int>(i % per_head) % a.nblk;
        const int sa = a.cu[seg * a.cu_s], sb = a.cu[(seg + 1) * a.cu_s];
        const int r_end = a.num_summary == 0 ? sb : sa + min(a.num_summary, sb - sa);
        const int res0 = sa + blk * kRows, res_end = kPass == kPassLse ? r_end : sb;
        if (res0 >= res_end) continue;  // past the segment's rows (also: empty segments)
        const int n_str = (kPass == kPassLse ? sb : r_end) - sa, n_tiles = (n_str + N - 1) / N;
        const int b = k & 1;
        claim(b);
        items[b] = Item{sa, n_str, res0, res_end, r_end - sa, h};
        mbar_expect_tx(res_full(b), L::kResBytes);  // publishes items[b] (release) with the tile's bytes
        load_tile<D, kRows>(res_buf(b), rm, rt, res0, h, r_hi, res_full(b));
        for (int t = 0; t < n_tiles; ++t, ++g) {
          const int s = g % kStages;
          if (g >= kStages) mbar_wait(empty(s), ((g / kStages) - 1) & 1);  // the consumers are done with g - kStages
          const uint32_t slot = stage0 + s * L::kStageBytes;
          mbar_expect_tx(full(s), L::kTileBytes + (kPass == kPassColsum ? L::kLseBytes : 0));
          load_tile<D, N>(slot, sm, st, sa + t * N, h, s_hi, full(s));
          if constexpr (kPass == kPassColsum) tma_2d(slot + L::kTileBytes, &a.lse, (sa + t * N) & ~3, h, full(s));
        }
        ++k;
      }
      claim(k & 1);
      items[k & 1].n_str = 0;  // no more items
      mbar_arrive(res_full(k & 1));
    } else if (kNl && threadIdx.x / 32 == 1) {  // nl = -lse_scale lse, -inf past the segment
      const int lane = threadIdx.x % 32;
      int g = 0;
      for (int k = 0;; ++k) {
        const Item it = wait_item(k);
        if (it.n_str == 0) break;
        for (int t = 0; t * N < it.n_str; ++t, ++g) {
          const int s = g % kStages, off = (it.sa + t * N) & 3, valid = it.n_str - t * N;
          float* nl = nl_of(s);
          mbar_wait(full(s), (g / kStages) & 1);
          float v[N / 32];
#pragma unroll
          for (int i = 0; i < N / 32; ++i) {
            const int j = lane + 32 * i;
            v[i] = j < valid ? -nl[off + j] * a.lse_scale : -INFINITY;
          }
          __syncwarp();  // every lane has read the box before any overwrites it
#pragma unroll
          for (int i = 0; i < N / 32; ++i) nl[lane + 32 * i] = v[i];
          mbar_arrive(ready(s));
        }
        mbar_arrive(res_empty(k & 1));  // done with the Item
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(Tiles<C, N>::kConsumerRegs));

  const int c = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int col_base = 2 * (lane % 4);  // this thread's columns in a tile: 8 i + col_base + {0, 1}, i < N / 8
  constexpr bool kRegA = Tiles<C, N>::template kRegisterA<kPass, D>;
  uint32_t afrag[kRegA ? L::kKSteps : 1][4];  // kRegA: this warp's 16 resident rows, every k step
  float s0[kS], s1[kS];

  int g = 0;  // the CTA's streamed tiles consumed so far
  for (int k = 0;; ++k) {
    const Item it = wait_item(k);
    const int n_tiles = (it.n_str + N - 1) / N;
    if (n_tiles == 0) break;
    const uint32_t res = res_buf(k & 1);

    // Pass 1: running max (log2 units) and sum of rows (hf = 0, 1) over this thread's columns, two partial sums
    // each. Pass 2: the sums of p for key rows hf = 0, 1, two partials each.
    float m_run[2] = {-INFINITY, -INFINITY}, acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

    auto issue = [&](float (&S)[kS], int t) {  // S = A B^T of the item's tile t
      const int s = (g + t) % kStages;
      mbar_wait(full(s), ((g + t) / kStages) & 1);
      const uint32_t slot = stage0 + s * L::kStageBytes;
#pragma unroll
      for (int r = 0; r < kS; ++r) fence_operand(S[r]);
      sparsevila::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < L::kKSteps; ++kk) {
        if constexpr (kRegA)
          sparsevila::WgmmaRs64x64<T>::run(S, afrag[kk], tile_desc<D, N>(slot, kk, 0), kk > 0);
        else
          sparsevila::Wgmma64xN<T, N>::run(S, tile_desc<D, kRows>(res, kk, 64 * c), tile_desc<D, N>(slot, kk, 0),
                                           kk > 0);
      }
      sparsevila::wgmma_commit();
#pragma unroll
      for (int r = 0; r < kS; ++r) fence_operand(S[r]);
    };

    // Two partial sums per row: shorter dependency chains. (Trees of depth 5 over a tile's 32 values per row
    // measured slower on the H200: 7.6 vs 7.0 ms per pass at QwenVL 32k, bench/NOTES.md.)
    // ``last``: an item's last tile, the only one that can be partial, is the only one that masks (a constant at
    // each call: ptxas if-converted the mask into every tile while its one test was the tile's fill, 4-8 % of a
    // pass).
    auto consume = [&](float (&S)[kS], int t, bool last) {
      const int s = (g + t) % kStages;
      if constexpr (kPass == kPassLse) {
        const int valid = it.n_str - t * N;  // streamed rows of this tile inside the segment (>= 1; >= N: all)
        if (last && valid < N) {
#pragma unroll
          for (int i = 0; i < N / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (8 * i + col_base + (e & 1) >= valid) S[4 * i + e] = -INFINITY;
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = -INFINITY;
#pragma unroll
          for (int i = 0; i < N / 8; ++i) mx = fmaxf(mx, fmaxf(S[4 * i + 2 * hf], S[4 * i + 2 * hf + 1]));
          const float m_new = fmaxf(m_run[hf], mx * a.qk_scale2);  // scale > 0 commutes with max
          const float safe = m_new == -INFINITY ? 0.f : m_new;  // -inf while every column seen was masked
          const float rescale = ex2_mufu(m_run[hf] - safe);    // 1 when the max did not grow
          acc[hf][0] *= rescale;
          acc[hf][1] *= rescale;
          m_run[hf] = m_new;
#pragma unroll
          for (int i = 0; i < N / 8; ++i)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              acc[hf][e] += ex2_pair<kPolyEvery>(fmaf(S[4 * i + 2 * hf + e], a.qk_scale2, -safe), 2 * i + hf);
        }
      } else if constexpr (kNl) {
        mbar_wait(ready(s), ((g + t) / kStages) & 1);
        const float2* nl = reinterpret_cast<const float2*>(nl_of(s));
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
          const float2 c2 = nl[(8 * i + col_base) / 2];
          const float cn[2] = {c2.x, c2.y};
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              acc[hf][e] += ex2_pair<kPolyEvery>(fmaf(S[4 * i + 2 * hf + e], a.qk_scale2, cn[e]), 2 * i + hf);
        }
      } else {
        const int valid = it.n_str - t * N;
        const float* ls = nl_of(s) + ((it.sa + t * N) & 3);  // this tile's lse
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
          const int col = 8 * i + col_base;
          float nl[2] = {-ls[col] * a.lse_scale, -ls[col + 1] * a.lse_scale};
          if (last && valid < N) {
            if (col >= valid) nl[0] = -INFINITY;
            if (col + 1 >= valid) nl[1] = -INFINITY;
          }
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              acc[hf][e] += ex2_pair<kPolyEvery>(fmaf(S[4 * i + 2 * hf + e], a.qk_scale2, nl[e]), 2 * i + hf);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(s));
    };

    // S of tile t + 1 is issued before tile t is consumed; the two register tiles alternate (the loop is unrolled
    // by two so that every register index is a constant, and has no branch between an issue and its wait).
    auto retired = [&](float (&S)[kS]) {
#pragma unroll
      for (int r = 0; r < kS; ++r) fence_operand(S[r]);
    };
    if constexpr (kRegA) {
#pragma unroll
      for (int kk = 0; kk < L::kKSteps; ++kk) load_a<D, kRows>(afrag[kk], res, kk, 64 * c + 16 * warp, lane);
    }
    issue(s0, 0);
    int t = 0;
    for (; t + 2 < n_tiles; t += 2) {
      issue(s1, t + 1);
      sparsevila::wgmma_wait<1>();
      retired(s0);
      consume(s0, t, false);
      issue(s0, t + 2);
      sparsevila::wgmma_wait<1>();
      retired(s1);
      consume(s1, t + 1, false);
    }
    if (t + 1 < n_tiles) {  // two tiles left
      issue(s1, t + 1);
      sparsevila::wgmma_wait<1>();
      retired(s0);
      consume(s0, t, false);
      sparsevila::wgmma_wait<0>();
      retired(s1);
      consume(s1, t + 1, true);
    } else {
      sparsevila::wgmma_wait<0>();
      retired(s0);
      consume(s0, t, true);
    }
    g += n_tiles;

    // Quad merge (lanes 4g .. 4g + 3 hold the same rows) and store by the quad's first lane.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = it.res0 + 64 * c + 16 * warp + lane / 4 + 8 * hf;
      if constexpr (kPass == kPassLse) {
        float mx = m_run[hf];
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float safe = mx == -INFINITY ? 0.f : mx;
        float l = (acc[hf][0] + acc[hf][1]) * ex2_mufu(m_run[hf] - safe);
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (lane % 4 == 0 && row < it.res_end) a.dst[it.h * a.dst_sh + row] = mx + log2f(l);
      } else {
        float v = acc[hf][0] + acc[hf][1];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (lane % 4 == 0 && row < it.res_end)
          a.dst[it.h * a.dst_sh + row] = v * __frcp_rn(static_cast<float>(it.count));
      }
    }
    mbar_arrive(res_empty(k & 1));  // this thread's wgmmas have read the resident tile, its loads the Item
  }
#else
  __trap();  // built only for sm_90a (the host refuses other devices)
#endif
}

// ------------------------------------------------------------------------------------------------------ host

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiled>(nullptr);
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// TMA map of q or k [T, H, D] (elements at base + t * st + h * sh + d): dimensions (d, head, row) when the head
// stride is the smaller one, else (d, row, head); a dimension of size 1 gets a placeholder stride. Boxes of
// ``box_d`` columns x ``box_rows`` rows x 1 head.
CUresult qk_map(CUtensorMap* map, int dtype, const void* base, int64_t T, int H, int D, int64_t st, int64_t sh,
                int box_d, cuuint32_t box_rows, CUtensorMapSwizzle swizzle, int head_inner) {
  const int64_t row_bytes = (T > 1 ? st : H * (int64_t)D) * 2, head_bytes = (H > 1 ? sh : D) * 2;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(head_inner ? H : T),
                              static_cast<cuuint64_t>(head_inner ? T : H)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_inner ? head_bytes : row_bytes),
                                 static_cast<cuuint64_t>(head_inner ? row_bytes : head_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_d), head_inner ? 1u : box_rows, head_inner ? box_rows : 1u};
  const cuuint32_t one[3] = {1, 1, 1};
  return encoder()(map, dtype == 0 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                   const_cast<void*>(base), dims, strides, box, one, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// TMA map of lse [H, T] fp32 (row stride sh), boxes of ``box`` tokens x 1 head.
CUresult lse_map(CUtensorMap* map, const float* base, int64_t T, int H, int64_t sh, cuuint32_t box_tokens) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(H)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>((H > 1 ? sh : (T + 3) / 4 * 4) * 4)};
  const cuuint32_t box[2] = {box_tokens, 1}, one[2] = {1, 1};
  return encoder()(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(base), dims, strides, box, one,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// A persistent grid: one CTA per SM (at most one fits: the register file), a.nblk x a.num_segments x a.heads work
// items.
template <typename T, int D, int kPass, int kPolyEvery, int C, int N>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};  // per instantiation: the devices it was configured on
  return sparsevila::launch_persistent(salience_wgmma_kernel<T, D, kPass, kPolyEvery, C, N>, configured,
                                       Layout<D, C, N>::kSmemBytes, Tiles<C, N>::kThreads, a,
                                       static_cast<int64_t>(a.nblk) * a.num_segments * a.heads, stream);
}

// 0 when the current device runs sm_90a code (compute capability exactly 9.0), else an error code.
int require_sm90a() {
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  return major == 9 && minor == 0 ? 0 : static_cast<int>(cudaErrorInvalidDeviceFunction);
}

// Pass kPass with C consumer warpgroups and N-row streamed tiles: the maps' boxes are the resident tile's rows for
// the resident operand (pass 1: q; pass 2: k) and N for the streamed one.
template <int kPass, int C, int N>
int run_tiles(int dtype, int head_dim, const void* q, const void* k, const int* cu, const float* lse, float lse_scale,
              float* dst, float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
              int heads, int num_summary, int poly_every, cudaStream_t stream) {
  constexpr int kRows = Tiles<C, N>::kRows;
  Args a{};
  const int tail = head_dim % 64 != 0;
  CUresult r = CUDA_SUCCESS;
  auto maps = [&](CUtensorMap* main, CUtensorMap* tail_map, int* head_inner, const void* base, int64_t st,
                  int64_t sh, cuuint32_t rows) {
    *head_inner = heads == 1 || tokens == 1 || sh <= st;  // rising strides: (d, head, row) or (d, row, head)
    if (r == CUDA_SUCCESS)
      r = qk_map(main, dtype, base, tokens, heads, head_dim, st, sh, 64, rows, CU_TENSOR_MAP_SWIZZLE_128B,
                 *head_inner);
    if (r == CUDA_SUCCESS && tail)
      r = qk_map(tail_map, dtype, base, tokens, heads, head_dim, st, sh, 16, rows, CU_TENSOR_MAP_SWIZZLE_32B,
                 *head_inner);
  };
  maps(&a.q_main, &a.q_tail, &a.q_head_inner, q, strides[0], strides[1], kPass == kPassLse ? kRows : N);
  maps(&a.k_main, &a.k_tail, &a.k_head_inner, k, strides[2], strides[3], kPass == kPassLse ? N : kRows);
  if (r == CUDA_SUCCESS && kPass == kPassColsum)
    r = lse_map(&a.lse, lse, tokens, heads, strides[5], Tiles<C, N>::kLseBox);
  if (r != CUDA_SUCCESS) return static_cast<int>(cudaErrorInvalidValue);
  a.cu = cu;
  a.dst = dst;
  a.cu_s = strides[4];
  a.dst_sh = strides[6];
  a.qk_scale2 = qk_scale2;
  a.lse_scale = lse_scale;
  a.num_summary = num_summary;
  a.nblk = (max(max_rows, 1) + kRows - 1) / kRows;
  a.num_segments = num_segments;
  a.heads = heads;
  return sparsevila::dispatch_salience(dtype, head_dim, poly_every, [&](auto t, auto d, auto p) {
    using T = typename decltype(t)::type;
    return static_cast<int>(launch<T, decltype(d)::value, kPass, decltype(p)::value, C, N>(a, stream));
  });
}

template <int kPass>
int run_pass(int dtype, int head_dim, const void* q, const void* k, const int* cu, const float* lse, float lse_scale,
             float* dst, float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
             int heads, int num_summary, int poly_every, int consumers, int tile_n, void* stream) {
  if (num_segments <= 0 || max_rows < 0 || num_summary < 0 || tokens <= 0 || heads <= 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (const int e = require_sm90a()) return e;
  if (encoder() == nullptr) return static_cast<int>(cudaErrorSymbolNotFound);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (consumers == 2 && tile_n == 128)
    return run_tiles<kPass, 2, 128>(dtype, head_dim, q, k, cu, lse, lse_scale, dst, qk_scale2, strides, tokens,
                                    num_segments, max_rows, heads, num_summary, poly_every, s);
  if (consumers == 4 && tile_n == 64)
    return run_tiles<kPass, 4, 64>(dtype, head_dim, q, k, cu, lse, lse_scale, dst, qk_scale2, strides, tokens,
                                   num_segments, max_rows, heads, num_summary, poly_every, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

extern "C" {

int svo_salience_wgmma_lse(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* lse2,
                           float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
                           int heads, int num_summary, int poly_every, int consumers, int tile_n, void* stream) {
  return run_pass<kPassLse>(dtype, head_dim, q, k, cu_seqlens, nullptr, 1.f, lse2, qk_scale2, strides, tokens,
                            num_segments, max_rows, heads, num_summary, poly_every, consumers, tile_n, stream);
}

int svo_salience_wgmma_colsum(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                              const float* lse, float lse_scale, float* out, float qk_scale2, const int64_t* strides,
                              int tokens, int num_segments, int max_seqlen, int heads, int num_summary,
                              int poly_every, int consumers, int tile_n, void* stream) {
  return run_pass<kPassColsum>(dtype, head_dim, q, k, cu_seqlens, lse, lse_scale, out, qk_scale2, strides, tokens,
                               num_segments, max_seqlen, heads, num_summary, poly_every, consumers, tile_n, stream);
}

}  // extern "C"
