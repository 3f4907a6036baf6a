// Standalone probe of bench/salience_fused.cu (an experiment: both salience passes in one kernel, segments of <= 768
// tokens; bench/NOTES.md) against the two passes of csrc/salience_wgmma.cu on the same inputs: S segments of `seg` tokens (T = S * seg), H heads, head
// dim D, bf16, timed with CUDA events in alternating rounds; for iterating on the kernel without the package build.
// Compile anywhere nvcc runs (no GPU needed), carry the binary to the GPU machine, run it:
//
//   nvcc -O3 -std=c++17 --use_fast_math -lineinfo -gencode arch=compute_90a,code=sm_90a -Icsrc \
//        bench/salience_fused_probe.cu bench/salience_fused.cu csrc/salience_wgmma.cu -o fused_probe
//   ./fused_probe D T H seg [iters [poly_every]]      e.g. ./fused_probe 72 46656 16 729   (SigLIP 64 frames)
//
// Inputs are hashed pseudo-random values in [-2, 2]. Printed: each kernel's median time over `iters` rounds, the
// largest relative difference of the fused column sums from the two passes' (both approximate the same float64
// values; tests/test_cuda_salience.py checks each against float64), and whether every fused launch gave the bits
// of its first.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sparsevila_cuda.h"

extern "C" int svo_salience_fused(int dtype, int head_dim, const void* q, const void* k, const int* cu_seqlens,
                                  float* out, float qk_scale2, const int64_t* strides, int num_segments,
                                  int max_seqlen, int heads, int num_summary, int poly_every, void* stream);

__global__ void fill(__nv_bfloat16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995;
    h ^= h >> 15;
    x[i] = __float2bfloat16(((h & 0xffff) / 65535.f - 0.5f) * 4.f);
  }
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s D T H seg [iters [poly_every]]\n", argv[0]);
    return 2;
  }
  const int D = atoi(argv[1]), T = atoi(argv[2]), H = atoi(argv[3]), seg = atoi(argv[4]);
  const int iters = argc > 5 ? atoi(argv[5]) : 20, poly = argc > 6 ? atoi(argv[6]) : 0;
  const int S = T / seg;
  std::vector<int> cu(S + 1);
  for (int i = 0; i <= S; ++i) cu[i] = i * seg;
  __nv_bfloat16 *q, *k;
  int* dcu;
  float *lse, *out2, *outf;
  const size_t n = (size_t)T * H * D;
  const int Tp = (T + 3) / 4 * 4;
  cudaMalloc(&q, n * 2);
  cudaMalloc(&k, n * 2);
  cudaMalloc(&dcu, (S + 1) * 4);
  cudaMalloc(&lse, (size_t)H * Tp * 4);
  cudaMalloc(&out2, (size_t)H * T * 4);
  cudaMalloc(&outf, (size_t)H * T * 4);
  fill<<<1024, 256>>>(q, n, 1);
  fill<<<1024, 256>>>(k, n, 2);
  cudaMemcpy(dcu, cu.data(), (S + 1) * 4, cudaMemcpyHostToDevice);
  const float qk2 = 1.4426950408889634f / sqrtf(D);
  const int64_t s1[7] = {H * D, D, H * D, D, 1, 0, Tp}, s2[7] = {H * D, D, H * D, D, 1, Tp, T};
  const int64_t sf[6] = {H * D, D, H * D, D, 1, T};
  cudaEvent_t e0, e1, e2;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventCreate(&e2);
  std::vector<float> t_two, t_fused, first((size_t)H * T), now(first.size()), two(first.size());
  int differ = 0;
  for (int it = 0; it <= iters; ++it) {
    cudaEventRecord(e0);
    int r1 = svo_salience_wgmma_lse(0, D, q, k, dcu, lse, qk2, s1, T, S, seg, H, 0, poly, 4, 64, nullptr);
    int r2 = svo_salience_wgmma_colsum(0, D, q, k, dcu, lse, 1.f, out2, qk2, s2, T, S, seg, H, 0, poly, 4, 64,
                                       nullptr);
    cudaEventRecord(e1);
    int r3 = svo_salience_fused(0, D, q, k, dcu, outf, qk2, sf, S, seg, H, 0, poly, nullptr);
    cudaEventRecord(e2);
    cudaEventSynchronize(e2);
    const cudaError_t e = cudaGetLastError();
    if (r1 || r2 || r3 || e) {
      printf("launch error %d %d %d %d (%s)\n", r1, r2, r3, (int)e, cudaGetErrorString(e));
      return 1;
    }
    float a, b;
    cudaEventElapsedTime(&a, e0, e1);
    cudaEventElapsedTime(&b, e1, e2);
    cudaMemcpy(it ? now.data() : first.data(), outf, first.size() * 4, cudaMemcpyDeviceToHost);
    if (!it) {
      cudaMemcpy(two.data(), out2, two.size() * 4, cudaMemcpyDeviceToHost);
      continue;
    }
    t_two.push_back(a);
    t_fused.push_back(b);
    differ += memcmp(now.data(), first.data(), first.size() * 4) != 0;
  }
  double worst = 0, sum = 0;
  for (size_t i = 0; i < first.size(); ++i) {
    worst = std::max(worst, std::fabs((double)first[i] - two[i]) / std::max(std::fabs((double)two[i]), 1e-6));
    sum += first[i];
  }
  const double floor_ms = (double)H * S * seg * seg / 3.9e12 * 1e3;  // one exp per score at 3.9e12 exp/s
  printf("D=%d T=%d H=%d seg=%d poly %d: two passes (wgmma 4x64) %.4f ms, fused %.4f ms (%.2fx), one-pass exp "
         "floor %.4f ms\n", D, T, H, seg, poly, median(t_two), median(t_fused), median(t_two) / median(t_fused),
         floor_ms);
  printf("check: fused vs two passes max rel diff %.3e, sum of column sums %.6f (want %d), repeat: %d of %d "
         "launches differ from the first\n", worst, sum, H * S, differ, iters);
  return 0;
}
