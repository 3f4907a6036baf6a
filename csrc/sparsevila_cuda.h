// C interface of the cuda backend's kernels (csrc/*.cu), called by the pybind11 module (csrc/bindings.cpp).
// Plain pointers, sizes and CUDA error codes only: neither side includes torch headers.
#pragma once

#include <stdint.h>

extern "C" {

// decode_attention over k, v [B, Hk, capacity, D] (decode_cluster.cu). dtype: 0 bf16, 1 fp16. strides: q (b, h),
// k (b, h, n), v (b, h, n), out (b, h), lse (b, h) in elements. When num_chunks > cluster (several clusters per
// row), po [B, Hq, num_chunks / cluster, D] and pl [B, Hq, num_chunks / cluster] fp32 hold the clusters'
// partials and a second kernel merges them. timeline: null, or per-CTA phase clocks (bench/decode_timeline.py).
// Returns a cudaError_t (0: launched).
int svo_decode_cluster(int dtype, int head_dim, const void* q, const void* k, const void* v, const int* lengths,
                       void* out, float* lse, float* po, float* pl, float qk_scale, const int64_t* strides,
                       long long* timeline, int batch, int hk, int group, int hq, int num_chunks, int cluster,
                       int warps, int pdl, void* stream);

// How many clusters of `cluster` CTAs of the decode kernel can be resident at once (-1 on error).
int svo_decode_max_active_clusters(int dtype, int head_dim, int cluster, int warps, int group);

// visual_salience passes (salience.cu). dtype: 0 bf16, 1 fp16; head_dim 64, 72, 80 or 128; poly_every 0, 2, 4 or
// 8 (every poly_every-th column pair of a thread's scores takes its exp2 from the FMA-pipe polynomial, 0: none).
// strides (elements): q (t, h), k (t, h), cu_seqlens, lse (h), the destination (h); rows of q/k 16-byte aligned.
// Segments s = 0..num_segments-1 are [cu[s], cu[s+1]); rows R = all of them (num_summary 0) or the first
// min(num_summary, n). svo_salience_lse: lse2 [H, T] (log2 units) for the rows of R, max_rows >= |R| of every
// segment. svo_salience_colsum: out [H, T] = 1/|R| sum_{i in R} 2^(qk_scale2 s_ij - lse_scale lse[h, i]) for every
// key, max_seqlen >= every segment's length. Returns a cudaError_t (0: launched).
int svo_salience_lse(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* lse2,
                     float qk_scale2, const int64_t* strides, int num_segments, int max_rows, int heads,
                     int num_summary, int poly_every, void* stream);
int svo_salience_colsum(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                        const float* lse, float lse_scale, float* out, float qk_scale2, const int64_t* strides,
                        int num_segments, int max_seqlen, int heads, int num_summary, int poly_every, void* stream);
// out[j] = inv_heads * sum_{h = 0..heads-1} part[h * stride_ph + j] (heads in order: deterministic).
int svo_salience_sum_heads(const float* part, float* out, int tokens, int heads, int64_t stride_ph, float inv_heads,
                           void* stream);
// The same two passes by the Hopper kernels (salience_wgmma.cu: TMA, wgmma, warp specialization; the current device
// must be of compute capability 9.0). tokens = T; q/k rows and head strides, the lse row stride (strides[5]) and
// every base address 16-byte aligned (TMA); lse2 / lse rows are read by TMA, out / lse2 written as above. Tiles:
// consumers (consumer warpgroups of 64 resident rows) and tile_n (streamed rows per tile): 2 and 128, or 4 and 64.
int svo_salience_wgmma_lse(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens, float* lse2,
                           float qk_scale2, const int64_t* strides, int tokens, int num_segments, int max_rows,
                           int heads, int num_summary, int poly_every, int consumers, int tile_n, void* stream);
int svo_salience_wgmma_colsum(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                              const float* lse, float lse_scale, float* out, float qk_scale2, const int64_t* strides,
                              int tokens, int num_segments, int max_seqlen, int heads, int num_summary,
                              int poly_every, int consumers, int tile_n, void* stream);
// Rows of a salience CTA (the grid has ceil(max_rows / this) CTAs per segment and head).
int svo_salience_block_rows();

// w4a16_linear (gemv4.cu): out [M, N] (contiguous) = y = x [M, K] @ W^T (+ bias) for 1 <= M <= 16, N a multiple
// of 8, W in the 4-bit format of sparsevila_ops.quant.W4Weight (qweight int32 [R, K/8], scales [K/G, R] in x's
// dtype, zeros uint8 [K/G, R], G = group a multiple of 128 dividing K; all contiguous, 16-byte aligned) with R = N,
// or with glu R = 2N and out[:, n] = glu(y[:, n], y[:, N + n]) (glu.cuh). dtype: 0 bf16, 1 fp16; sx: x's row stride
// in elements (a multiple of 8, x 16-byte aligned, unit column stride); bias null or [R]. Config: tiles (1, 2 or 4;
// glu 2 or 4) of 8 W rows per warp, warps (1..8) per CTA of which kwarps (dividing warps) split K, stages (2, 4, 6
// or 8) of each warp's cp.async ring, aw (1: the weights as the MMA's A operand, for M <= 8 and tiles 2 or 4).
// Returns a cudaError_t.
int svo_w4a16_linear(int dtype, const void* x, const int* qweight, const void* scales, const uint8_t* zeros,
                     const void* bias, void* out, int M, int N, int K, int group, long long sx, int glu, int tiles,
                     int warps, int kwarps, int stages, int aw, int pdl, void* stream);

// gemv (gemv.cu): out [M, N] (contiguous) = y = x [M, K] @ W^T (+ bias) for 1 <= M <= 8, W in x's dtype with row
// stride sw (a multiple of 8, >= K; unit column stride, 16-byte aligned), K a multiple of 8; with glu = 1, W is
// [2N, K] (bias [2N]) and out = round(round(silu(round(y[:, :N]))) * round(y[:, N:])). dtype: 0 bf16, 1 fp16; sx:
// x's row stride in elements (a multiple of 8, x 16-byte aligned, unit column stride); bias null or as W's rows.
// Config: rows (1, 2 or 4) of out per warp, warps (1..8) per CTA of which kwarps (dividing warps) split K. Returns
// a cudaError_t. Folds (M = 1 only): norm non-null (g [K] in x's dtype, 16-byte aligned, K <= 12288) computes y from
// x * g / sqrt(mean(x^2) + eps) (an RMSNorm folded into the projection); residual non-null (r [1, N] contiguous)
// stores out = round(r + round(y)) after glu.
int svo_gemv(int dtype, const void* x, const void* w, const void* bias, void* out, int M, int N, int K, long long sx,
             long long sw, int glu, const void* norm, float eps, const void* residual, int rows, int warps,
             int kwarps, int pdl, void* stream);

const char* svo_error_string(int code);

}  // extern "C"
