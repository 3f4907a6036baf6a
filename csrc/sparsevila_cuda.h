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

const char* svo_error_string(int code);

}  // extern "C"
