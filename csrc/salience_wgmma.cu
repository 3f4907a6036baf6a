// visual_salience, cuda backend, Hopper kernels (sm_90a): the two passes of salience.cu (same math, arguments and
// outputs; see its file comment) with TMA tile copies, wgmma tensor cores and warp specialization, so that each
// tile's QK^T runs on the tensor cores while the previous tile's exp2s run on MUFU and the FMA pipe.
//
// A CTA is 3 warpgroups (384 threads). Warpgroup 0 produces: one thread issues every TMA copy, the others exit
// after handing their registers to the consumers (setmaxnreg). Warpgroups 1 and 2 consume: each owns 64 of the
// CTA's kRows = 128 "resident" rows (pass 1: query rows of R; pass 2: keys of the segment), a wgmma A operand in
// shared memory loaded once. The segment's other operand streams through a kStages ring of 128-row tiles (pass 1:
// the keys; pass 2: the rows of R and their lse). Per tile a consumer issues S = A B^T (m64n128, k = D padded to
// 16; asynchronous), then spends the time it runs on the previous tile's S:
//   pass 1: running max and sum per row over the thread's columns (log2 units), one quad merge at the end;
//   pass 2: p = 2^(qk_scale2 s - lse_scale lse[col]) summed per key row, one quad sum at the end.
// Two S tiles are live per thread (2 x 64 fp32), hence setmaxnreg 240 for the consumers, 24 for the producer.
//
// Shared memory holds a 128-row tile of head dim D as TMA writes it: columns 0..63 (and 64..127 at D = 128) in the
// 128-byte swizzle (128 B per row, 1024-byte atoms of 8 rows), and for D = 72 / 80 columns 64..79 in the 32-byte
// swizzle (32 B per row; columns past D zero-filled by TMA). The MMA k extent is thus 80 for D = 72 / 80: no more
// padding than the 16-column wgmma k step. Rows past the tensor's end arrive as zeros; rows past the segment's end
// are masked (pass 1: score -inf; pass 2: its lse term -inf, p = 0). Resident rows past the segment are computed
// and not stored.
// Barriers: full[s] (the producer's expect_tx; the copies' bytes complete it), empty[s] (one arrive per consumer
// warp once its wgmma has read the slot and its lse loads are done), res_full (the resident tile).
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

constexpr int kConsumers = 2;                    // consumer warpgroups
constexpr int kThreads = 128 * (1 + kConsumers);  // + the producer warpgroup
constexpr int kRows = 64 * kConsumers;           // resident rows per CTA = streamed rows per tile = TMA box rows
constexpr int kStages = 4;
// A TMA box must start 16-byte aligned in its innermost dimension: the lse of a tile's 128 rows comes as a box of
// 132 floats from the row rounded down to a multiple of 4.
constexpr int kLseBox = kRows + 4;
constexpr int kPassLse = 1;
constexpr int kPassColsum = 2;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;  // 24 + 2 x 240 = 3 x 168: the register file of one CTA of 384 threads
static_assert(kRows == 128, "the wgmma tile is 64 rows per consumer x 128 streamed rows");

template <int D>
struct Layout {
  static_assert(D == 64 || D == 72 || D == 80 || D == 128, "head dim");
  static constexpr int kMain = D / 64;                  // 128B-swizzled regions of 64 columns
  static constexpr bool kTail = D % 64 != 0;            // columns 64..79 in a 32B-swizzled region
  static constexpr int kKSteps = 4 * kMain + (kTail ? 1 : 0);
  static constexpr int kRegion = kRows * 128;
  static constexpr int kTailBytes = kRows * 32;
  static constexpr int kTileBytes = kMain * kRegion + (kTail ? kTailBytes : 0);  // a multiple of 1024
  static constexpr int kLseBytes = kLseBox * 4;
  static constexpr int kStageBytes = (kTileBytes + kLseBytes + 1023) / 1024 * 1024;  // stages stay 1024-aligned
  static constexpr int kBarBytes = 8 * (2 * kStages + 1);
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kTileBytes + kStages * kStageBytes + kBarBytes;
  static_assert(kTileBytes % 1024 == 0 && kSmemBytes <= 227 * 1024, "shared memory");
};

struct Args {
  CUtensorMap q_main, q_tail, k_main, k_tail;  // q, k [T, H, D]: boxes of 64 / 16 columns x 128 rows x 1 head
  CUtensorMap lse;                             // pass 2: lse [H, T] fp32, boxes of kLseBox rows x 1 head
  const int* cu;                               // cu_seqlens, stride cu_s
  float* dst;                                  // pass 1: lse2 [H, T]; pass 2: salience [H, T]; row stride dst_sh
  int64_t cu_s, dst_sh;
  float qk_scale2;  // scale * log2 e
  float lse_scale;  // 1 (log2 lse) or log2 e (natural lse)
  int num_summary;
  int nblk;                      // CTAs per segment along grid x
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

// Rows [row, row + 128) of head h, every column region of Layout<D>, into the tile at ``dst``.
template <int D>
__device__ __forceinline__ void load_tile(uint32_t dst, const CUtensorMap* main, const CUtensorMap* tail, int row,
                                          int h, int head_inner, uint32_t bar) {
  using L = Layout<D>;
  const int c1 = head_inner ? h : row, c2 = head_inner ? row : h;
#pragma unroll
  for (int p = 0; p < L::kMain; ++p) tma_3d(dst + p * L::kRegion, main, 64 * p, c1, c2, bar);
  if constexpr (L::kTail) tma_3d(dst + L::kMain * L::kRegion, tail, 64, c1, c2, bar);
}

// Descriptor of k step kk (16 columns) of the 64 or 128 rows starting at row ``row0`` of the tile at ``tile``.
template <int D>
__device__ __forceinline__ uint64_t tile_desc(uint32_t tile, int kk, int row0) {
  using L = Layout<D>;
  if (kk < 4 * L::kMain)
    return wgmma_desc(tile + (kk / 4) * L::kRegion + row0 * 128 + (kk % 4) * 32, Swizzle::k128B, 128);
  return wgmma_desc(tile + L::kMain * L::kRegion + row0 * 32, Swizzle::k32B, 32);
}

#endif

template <typename T, int D, int kPass, int kPolyEvery>
__global__ void __launch_bounds__(kThreads, 1) salience_wgmma_kernel(const __grid_constant__ Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<D>;
  extern __shared__ unsigned char smem_raw[];

  const int seg = blockIdx.x / a.nblk, blk = blockIdx.x % a.nblk;
  const int h = blockIdx.y;
  const int sa = a.cu[seg * a.cu_s], sb = a.cu[(seg + 1) * a.cu_s];
  const int r_end = a.num_summary == 0 ? sb : sa + min(a.num_summary, sb - sa);
  const int res0 = sa + blk * kRows;
  const int res_end = kPass == kPassLse ? r_end : sb;
  const int str_end = kPass == kPassLse ? sb : r_end;
  if (res0 >= res_end) return;  // the whole CTA, before any barrier (also: empty segments)
  const int n_str = str_end - sa;  // >= 1
  const int n_tiles = (n_str + kRows - 1) / kRows;

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t res = (raw + 1023) & ~1023u;  // the resident tile; then the stages; then the barriers
  const uint32_t stage0 = res + L::kTileBytes;
  const uint32_t bars = stage0 + kStages * L::kStageBytes;
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (kStages + s); };
  const uint32_t res_full = bars + 16 * kStages;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 4 * kConsumers);
    }
    mbar_init(res_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      const CUtensorMap *rm = kPass == kPassLse ? &a.q_main : &a.k_main, *rt = kPass == kPassLse ? &a.q_tail : &a.k_tail;
      const CUtensorMap *sm = kPass == kPassLse ? &a.k_main : &a.q_main, *st = kPass == kPassLse ? &a.k_tail : &a.q_tail;
      mbar_expect_tx(res_full, L::kTileBytes);
      const int r_hi = kPass == kPassLse ? a.q_head_inner : a.k_head_inner;
      const int s_hi = kPass == kPassLse ? a.k_head_inner : a.q_head_inner;
      load_tile<D>(res, rm, rt, res0, h, r_hi, res_full);
      for (int t = 0; t < n_tiles; ++t) {
        const int s = t % kStages;
        if (t >= kStages) mbar_wait(empty(s), ((t / kStages) - 1) & 1);  // the consumers are done with tile t - kStages
        const uint32_t slot = stage0 + s * L::kStageBytes;
        mbar_expect_tx(full(s), L::kTileBytes + (kPass == kPassColsum ? L::kLseBytes : 0));
        load_tile<D>(slot, sm, st, sa + t * kRows, h, s_hi, full(s));
        if constexpr (kPass == kPassColsum) tma_2d(slot + L::kTileBytes, &a.lse, (sa + t * kRows) & ~3, h, full(s));
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));

  const int c = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int col_base = 2 * (lane % 4);  // this thread's columns in a tile: 8 i + col_base + {0, 1}, i < 16

  // Pass 1: running max (log2 units) and sum of rows (hf = 0, 1) over this thread's columns, two partial sums
  // each. Pass 2: the sums of p for key rows hf = 0, 1, two partials each.
  float m_run[2] = {-INFINITY, -INFINITY}, acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  float s0[64], s1[64];
  auto issue = [&](float (&S)[64], int t) {
    const int s = t % kStages;
    mbar_wait(full(s), (t / kStages) & 1);
    const uint32_t slot = stage0 + s * L::kStageBytes;
#pragma unroll
    for (int r = 0; r < 64; ++r) fence_operand(S[r]);
    sparsevila::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < L::kKSteps; ++kk)
      sparsevila::Wgmma64x128<T>::run(S, tile_desc<D>(res, kk, 64 * c), tile_desc<D>(slot, kk, 0), kk > 0);
    sparsevila::wgmma_commit();
#pragma unroll
    for (int r = 0; r < 64; ++r) fence_operand(S[r]);
  };

  // Two partial sums per row: shorter dependency chains. (Trees of depth 5 over a tile's 32 values per row measured
  // slower on the H200: 7.6 vs 7.0 ms per pass at QwenVL 32k, bench/NOTES.md.)
  auto consume = [&](float (&S)[64], int t) {
    const int valid = n_str - t * kRows;  // streamed rows of this tile inside the segment (>= 1; >= 128: all)
    if constexpr (kPass == kPassLse) {
      if (valid < kRows) {
#pragma unroll
        for (int i = 0; i < 16; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (8 * i + col_base + (e & 1) >= valid) S[4 * i + e] = -INFINITY;
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < 16; ++i) mx = fmaxf(mx, fmaxf(S[4 * i + 2 * hf], S[4 * i + 2 * hf + 1]));
        const float m_new = fmaxf(m_run[hf], mx * a.qk_scale2);  // scale > 0 commutes with max
        const float safe = m_new == -INFINITY ? 0.f : m_new;  // -inf while every column seen was masked
        const float rescale = ex2_mufu(m_run[hf] - safe);    // 1 when the max did not grow
        acc[hf][0] *= rescale;
        acc[hf][1] *= rescale;
        m_run[hf] = m_new;
#pragma unroll
        for (int i = 0; i < 16; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            acc[hf][e] += ex2_pair<kPolyEvery>(fmaf(S[4 * i + 2 * hf + e], a.qk_scale2, -safe), 2 * i + hf);
      }
    } else {
      const float* ls = reinterpret_cast<const float*>(smem_raw + (stage0 - raw) + (t % kStages) * L::kStageBytes +
                                                       L::kTileBytes) + ((sa + t * kRows) & 3);  // this tile's lse
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int col = 8 * i + col_base;
        float nl[2] = {-ls[col] * a.lse_scale, -ls[col + 1] * a.lse_scale};
        if (valid < kRows) {
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
    if (lane == 0) mbar_arrive(empty(t % kStages));
  };

  // S of tile t + 1 is issued before tile t is consumed; the two register tiles alternate (the loop is unrolled by
  // two so that every register index is a constant, and has no branch between an issue and its wait).
  auto retired = [&](float (&S)[64]) {
#pragma unroll
    for (int r = 0; r < 64; ++r) fence_operand(S[r]);
  };
  mbar_wait(res_full, 0);
  issue(s0, 0);
  int t = 0;
  for (; t + 2 < n_tiles; t += 2) {
    issue(s1, t + 1);
    sparsevila::wgmma_wait<1>();
    retired(s0);
    consume(s0, t);
    issue(s0, t + 2);
    sparsevila::wgmma_wait<1>();
    retired(s1);
    consume(s1, t + 1);
  }
  if (t + 1 < n_tiles) {  // two tiles left
    issue(s1, t + 1);
    sparsevila::wgmma_wait<1>();
    retired(s0);
    consume(s0, t);
    sparsevila::wgmma_wait<0>();
    retired(s1);
    consume(s1, t + 1);
  } else {
    sparsevila::wgmma_wait<0>();
    retired(s0);
    consume(s0, t);
  }

  // Quad merge (lanes 4g .. 4g + 3 hold the same rows) and store by the quad's first lane.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = res0 + 64 * c + 16 * warp + lane / 4 + 8 * hf;
    if constexpr (kPass == kPassLse) {
      float mx = m_run[hf];
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float safe = mx == -INFINITY ? 0.f : mx;
      float l = (acc[hf][0] + acc[hf][1]) * ex2_mufu(m_run[hf] - safe);
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (lane % 4 == 0 && row < res_end) a.dst[h * a.dst_sh + row] = mx + log2f(l);
    } else {
      float v = acc[hf][0] + acc[hf][1];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (lane % 4 == 0 && row < res_end) a.dst[h * a.dst_sh + row] = v * __frcp_rn(static_cast<float>(r_end - sa));
    }
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
// ``box_d`` columns x 128 rows x 1 head.
CUresult qk_map(CUtensorMap* map, int dtype, const void* base, int64_t T, int H, int D, int64_t st, int64_t sh,
                int box_d, CUtensorMapSwizzle swizzle, int head_inner) {
  const int64_t row_bytes = (T > 1 ? st : H * (int64_t)D) * 2, head_bytes = (H > 1 ? sh : D) * 2;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(head_inner ? H : T),
                              static_cast<cuuint64_t>(head_inner ? T : H)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_inner ? head_bytes : row_bytes),
                                 static_cast<cuuint64_t>(head_inner ? row_bytes : head_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_d), head_inner ? 1u : kRows, head_inner ? kRows : 1u};
  const cuuint32_t one[3] = {1, 1, 1};
  return encoder()(map, dtype == 0 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                   const_cast<void*>(base), dims, strides, box, one, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// TMA map of lse [H, T] fp32 (row stride sh), boxes of kLseBox tokens x 1 head.
CUresult lse_map(CUtensorMap* map, const float* base, int64_t T, int H, int64_t sh) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(H)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>((H > 1 ? sh : (T + 3) / 4 * 4) * 4)};
  const cuuint32_t box[2] = {kLseBox, 1}, one[2] = {1, 1};
  return encoder()(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(base), dims, strides, box, one,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

template <typename T, int D, int kPass, int kPolyEvery>
cudaError_t launch(const Args& a, int num_segments, int heads, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};  // per instantiation: the devices it was configured on
  return sparsevila::launch_segments(salience_wgmma_kernel<T, D, kPass, kPolyEvery>, configured,
                                     Layout<D>::kSmemBytes, kThreads, a, a.nblk, num_segments, heads, stream);
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

template <int kPass>
int run_pass(int dtype, int head_dim, const void* q, const void* k, const int* cu, const float* lse, float lse_scale,
             float* dst, float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
             int heads, int num_summary, int poly_every, void* stream) {
  if (num_segments <= 0 || max_rows < 0 || num_summary < 0 || tokens <= 0 || heads <= 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (const int e = require_sm90a()) return e;
  if (encoder() == nullptr) return static_cast<int>(cudaErrorSymbolNotFound);
  Args a{};
  const int tail = head_dim % 64 != 0;
  CUresult r = CUDA_SUCCESS;
  auto maps = [&](CUtensorMap* main, CUtensorMap* tail_map, int* head_inner, const void* base, int64_t st,
                  int64_t sh) {
    *head_inner = heads == 1 || tokens == 1 || sh <= st;  // rising strides: (d, head, row) or (d, row, head)
    if (r == CUDA_SUCCESS)
      r = qk_map(main, dtype, base, tokens, heads, head_dim, st, sh, 64, CU_TENSOR_MAP_SWIZZLE_128B, *head_inner);
    if (r == CUDA_SUCCESS && tail)
      r = qk_map(tail_map, dtype, base, tokens, heads, head_dim, st, sh, 16, CU_TENSOR_MAP_SWIZZLE_32B, *head_inner);
  };
  maps(&a.q_main, &a.q_tail, &a.q_head_inner, q, strides[0], strides[1]);
  maps(&a.k_main, &a.k_tail, &a.k_head_inner, k, strides[2], strides[3]);
  if (r == CUDA_SUCCESS && kPass == kPassColsum) r = lse_map(&a.lse, lse, tokens, heads, strides[5]);
  if (r != CUDA_SUCCESS) return static_cast<int>(cudaErrorInvalidValue);
  a.cu = cu;
  a.dst = dst;
  a.cu_s = strides[4];
  a.dst_sh = strides[6];
  a.qk_scale2 = qk_scale2;
  a.lse_scale = lse_scale;
  a.num_summary = num_summary;
  a.nblk = (max(max_rows, 1) + kRows - 1) / kRows;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return sparsevila::dispatch_salience(dtype, head_dim, poly_every, [&](auto t, auto d, auto p) {
    using T = typename decltype(t)::type;
    return static_cast<int>(launch<T, decltype(d)::value, kPass, decltype(p)::value>(a, num_segments, heads, s));
  });
}

}  // namespace

extern "C" {

int svo_salience_wgmma_lse(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* lse2,
                           float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
                           int heads, int num_summary, int poly_every, void* stream) {
  return run_pass<kPassLse>(dtype, head_dim, q, k, cu_seqlens, nullptr, 1.f, lse2, qk_scale2, strides, tokens,
                            num_segments, max_rows, heads, num_summary, poly_every, stream);
}

int svo_salience_wgmma_colsum(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                              const float* lse, float lse_scale, float* out, float qk_scale2, const int64_t* strides,
                              int tokens, int num_segments, int max_seqlen, int heads, int num_summary,
                              int poly_every, void* stream) {
  return run_pass<kPassColsum>(dtype, head_dim, q, k, cu_seqlens, lse, lse_scale, out, qk_scale2, strides, tokens,
                               num_segments, max_seqlen, heads, num_summary, poly_every, stream);
}

}  // extern "C"
