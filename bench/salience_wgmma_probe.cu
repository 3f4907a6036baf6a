// Standalone probe of csrc/salience_wgmma.cu: both passes over S segments of `seg` tokens (T = S * seg), H heads,
// head dim D, bf16, timed with CUDA events; for iterating on the kernel without the package build. Compile anywhere
// nvcc runs (no GPU needed), carry the binary to the GPU machine, run it (a second; ncu in under a minute):
//
//   nvcc -O3 -std=c++17 --use_fast_math -lineinfo -gencode arch=compute_90a,code=sm_90a -Icsrc \
//        -DSRC='"salience_wgmma.cu"' bench/salience_wgmma_probe.cu -o probe
//   ./probe D T H [seg [iters [poly_every [consumers tile_n]]]]   e.g. ./probe 80 32768 16   (QwenVL 32k, 2 x 128)
//   ncu --kernel-name regex:salience_wgmma --launch-skip 2 --launch-count 2 --section WarpStateStats ./probe 80 32768 16 32768 1
//
// Inputs are hashed pseudo-random values in [-2, 2]; the results are only sanity-checked here (the column sums of
// each head and segment add up to 1; tests/test_cuda_salience.py and bench/sanitize_salience.py check them).
#include SRC
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
__global__ void fill(__nv_bfloat16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    x[i] = __float2bfloat16(((h & 0xffff) / 65535.f - 0.5f) * 4.f);
  }
}
int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s D T H [seg [iters [poly_every [consumers tile_n]]]]\n", argv[0]);
    return 2;
  }
  const int D = atoi(argv[1]), T = atoi(argv[2]), H = atoi(argv[3]), seg = argc > 4 ? atoi(argv[4]) : T;
  const int iters = argc > 5 ? atoi(argv[5]) : 10, poly = argc > 6 ? atoi(argv[6]) : 0;
  const int consumers = argc > 8 ? atoi(argv[7]) : 2, tile_n = argc > 8 ? atoi(argv[8]) : 128;
  const int S = T / seg;
  std::vector<int> cu(S + 1); for (int i = 0; i <= S; ++i) cu[i] = i * seg;
  __nv_bfloat16 *q, *k; int* dcu; float *lse, *out;
  size_t n = (size_t)T * H * D;
  cudaMalloc(&q, n * 2); cudaMalloc(&k, n * 2); cudaMalloc(&dcu, (S + 1) * 4);
  const int Tp = (T + 3) / 4 * 4;
  cudaMalloc(&lse, (size_t)H * Tp * 4); cudaMalloc(&out, (size_t)H * T * 4);
  fill<<<1024, 256>>>(q, n, 1); fill<<<1024, 256>>>(k, n, 2);
  cudaMemcpy(dcu, cu.data(), (S + 1) * 4, cudaMemcpyHostToDevice);
  const float qk2 = 1.4426950408889634f / sqrtf(D);
  int64_t s1[7] = {H * D, D, H * D, D, 1, 0, Tp}, s2[7] = {H * D, D, H * D, D, 1, Tp, T};
  cudaEvent_t e0, e1, e2; cudaEventCreate(&e0); cudaEventCreate(&e1); cudaEventCreate(&e2);
  float t1 = 0, t2 = 0;
  // Every launch's outputs against the first one's, bit for bit (the kernels are deterministic): a differing
  // column sum is reported with its work item (head, segment, block of kRows keys) and where the persistent grid
  // ran it: CTA item % grid, the CTA's ordinal k = item / grid and resident buffer k % 2 (no item is empty here).
  const int krows = 64 * consumers, nblk = (seg + krows - 1) / krows, items = H * S * nblk;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int grid = items < sms ? items : sms;
  std::vector<float> first_out((size_t)H * T), first_lse((size_t)H * Tp), now_out(first_out.size()),
      now_lse(first_lse.size());
  int bad_launches = 0, bad_lse_launches = 0, reported = 0;
  for (int it = 0; it < iters + 1; ++it) {
    cudaEventRecord(e0);
    int r1 = svo_salience_wgmma_lse(0, D, q, k, dcu, lse, qk2, s1, T, S, seg, H, 0, poly, consumers, tile_n, nullptr);
    cudaEventRecord(e1);
    int r2 = svo_salience_wgmma_colsum(0, D, q, k, dcu, lse, 1.f, out, qk2, s2, T, S, seg, H, 0, poly, consumers, tile_n,
                                       nullptr);
    cudaEventRecord(e2);
    cudaEventSynchronize(e2);
    if (r1 || r2) { printf("launch error %d %d\n", r1, r2); return 1; }
    float a, b; cudaEventElapsedTime(&a, e0, e1); cudaEventElapsedTime(&b, e1, e2);
    if (it) { t1 += a; t2 += b; }
    float* o = it ? now_out.data() : first_out.data();
    float* l = it ? now_lse.data() : first_lse.data();
    cudaMemcpy(o, out, first_out.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(l, lse, first_lse.size() * 4, cudaMemcpyDeviceToHost);
    if (!it) continue;
    bad_lse_launches += memcmp(l, first_lse.data(), first_lse.size() * 4) != 0;
    std::vector<int> bad_items;  // the work items holding a differing key, in order, each once
    for (int hh = 0; hh < H; ++hh)
      for (int t = 0; t < T; ++t) {
        const size_t i = (size_t)hh * T + t;
        if (memcmp(&o[i], &first_out[i], 4) == 0) continue;
        const int sg = t / seg, blk = (t % seg) / krows, item = (hh * S + sg) * nblk + blk;
        if (bad_items.empty() || bad_items.back() != item) bad_items.push_back(item);
      }
    if (!bad_items.empty() && reported++ < 8) {
      printf("repeat: launch %d: %zu items differ:", it, bad_items.size());
      for (size_t j = 0; j < bad_items.size() && j < 12; ++j) {
        const int item = bad_items[j];
        printf(" %d (CTA %d, k %d, buffer %d)", item, item % grid, item / grid, (item / grid) % 2);
      }
      printf("\n");
    }
    bad_launches += !bad_items.empty();
  }
  printf("repeat check: %d of %d column-sum launches and %d LSE launches differ from the first\n", bad_launches, iters,
         bad_lse_launches);
  cudaError_t s = cudaDeviceSynchronize();
  {  // every head of every segment sums to 1 (the mean over rows of each row's probabilities): a sanity check, and
     // a fingerprint (weighted sum) for comparing two builds' outputs
    std::vector<float> h((size_t)H * T);
    cudaMemcpy(h.data(), out, h.size() * 4, cudaMemcpyDeviceToHost);
    double tot = 0, w = 0;
    for (size_t i = 0; i < h.size(); ++i) { tot += h[i]; w += h[i] * (double)(i % 9973); }
    printf("check: sum %.6f (heads x segments %d) weighted %.6f\n", tot, H * S, w);
    std::vector<float> l((size_t)H * Tp);  // the LSE pass's output alone, to tell which pass differs between builds
    cudaMemcpy(l.data(), lse, l.size() * 4, cudaMemcpyDeviceToHost);
    double lw = 0;
    for (int hh = 0; hh < H; ++hh)
      for (int t = 0; t < T; ++t) lw += l[(size_t)hh * Tp + t] * (double)((hh * T + t) % 9973);
    printf("lse check: weighted %.6f\n", lw);
  }
  const double exps = (double)H * S * seg * (double)seg, floor_ms = exps / 3.9e12 * 1e3;
  printf("D=%d T=%d H=%d seg=%d C=%d N=%d: lse %.3f ms, colsum %.3f ms (exp floor per pass %.3f ms) poly %d %s\n", D, T,
         H, seg, consumers, tile_n, t1 / iters, t2 / iters, floor_ms, poly, cudaGetErrorString(s));
  return 0;
}
