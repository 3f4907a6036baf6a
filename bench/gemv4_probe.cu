// Standalone check and timing of csrc/gemv4.cu without the package build (H200 runs: bench/NOTES.md, "W4A16 GEMV
// on the cuda backend"). Build: nvcc -std=c++17 -O3 -arch=sm_90a -o gemv4_probe bench/gemv4_probe.cu
//   ./gemv4_probe            correctness of a grid of launches (bf16/fp16, awkward shapes, M 1-16, groups, configs, aw 0/1)
//   ./gemv4_probe time       + every config on the Qwen2.5-7B layer shapes at M 1 and 8 (rotating weight copies)
//   ./gemv4_probe one N K M tiles warps kwarps stages     one config (for ncu)
#include "../csrc/gemv4.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
#include <random>
#include <algorithm>
#include <cuda_bf16.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

template <typename T> uint16_t bits(float f) { T h = T(f); return *reinterpret_cast<uint16_t*>(&h); }
template <typename T> float val(uint16_t b) { T h; *reinterpret_cast<uint16_t*>(&h) = b; return float(h); }

int smem_bytes_host(int tiles, int stages, int warps, int M) { int ring = (stages * (tiles * 536 + M * 288) + 15) / 16 * 16; int red = 16 * 8 * tiles * 4; return warps * (ring > red ? ring : red); }
struct Prob { int M, N, K, G; const char* name; };

template <typename T>
bool check(int dtype, Prob p, int tiles, int warps, int kwarps, int stages, bool bias, std::mt19937& rng, int aw = 0) {
  int M = p.M, N = p.N, K = p.K, G = p.G;
  std::uniform_int_distribution<uint32_t> u32;
  std::uniform_real_distribution<float> uf(-1, 1), us(0.002f, 0.02f);
  long long sx = K + 8 * (rng() % 3);
  std::vector<int> qw((size_t)N * K / 8); for (auto& w : qw) w = (int)u32(rng);
  std::vector<uint16_t> sc((size_t)(K / G) * N), xb((size_t)M * sx), bb(N);
  std::vector<uint8_t> z((size_t)(K / G) * N);
  for (auto& s : sc) s = bits<T>(us(rng));
  for (auto& v : z) v = rng() % 16;
  for (auto& v : xb) v = bits<T>(uf(rng));
  for (auto& v : bb) v = bits<T>(uf(rng));
  int *dq; uint16_t *ds, *dx, *db, *dout; uint8_t* dz;
  CK(cudaMalloc(&dq, qw.size() * 4)); CK(cudaMalloc(&ds, sc.size() * 2)); CK(cudaMalloc(&dz, z.size()));
  CK(cudaMalloc(&dx, xb.size() * 2)); CK(cudaMalloc(&db, N * 2)); CK(cudaMalloc(&dout, (size_t)M * N * 2));
  CK(cudaMemcpy(dq, qw.data(), qw.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ds, sc.data(), sc.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dz, z.data(), z.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(db, bb.data(), N * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xFF, (size_t)M * N * 2));  // NaN poison
  int rc = svo_w4a16_linear(dtype, dx, dq, ds, dz, bias ? db : nullptr, dout, M, N, K, G, sx, 0, tiles, warps, kwarps, stages, aw, 0, 0);
  if (rc) { printf("launch rc %d %s\n", rc, cudaGetErrorString((cudaError_t)rc)); exit(1); }
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out((size_t)M * N);
  CK(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
  double maxerr = 0, maxref = 0;
  for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
    double acc = bias ? val<T>(bb[n]) : 0;
    for (int k = 0; k < K; ++k) {
      int blk = k / 128, kk = k % 128, j = kk / 16, i = kk % 16;
      uint32_t w = (uint32_t)qw[(size_t)n * K / 8 + blk * 16 + i];
      int q = (w >> (4 * j)) & 15;
      int gi = k / G;
      acc += (double)val<T>(xb[(size_t)m * sx + k]) * (q - (int)z[(size_t)gi * N + n]) * val<T>(sc[(size_t)gi * N + n]);
    }
    double o = val<T>(out[(size_t)m * N + n]);
    double e = std::isfinite(o) ? fabs(o - acc) : 1e30;
    maxerr = std::max(maxerr, e); maxref = std::max(maxref, fabs(acc));
  }
  bool ok = maxerr <= 8e-3 * maxref + 1e-6;  // bf16 output rounding ~ 4e-3
  printf("%s %-8s M=%2d N=%5d K=%5d G=%3d tiles=%d warps=%2d/%d stages=%d aw=%d bias=%d  maxerr %.3g / maxref %.3g  %s\n",
         dtype ? "fp16" : "bf16", p.name, M, N, K, G, tiles, warps, kwarps, stages, aw, bias, maxerr, maxref,
         ok ? "ok" : "WRONG");
  cudaFree(dq); cudaFree(ds); cudaFree(dz); cudaFree(dx); cudaFree(db); cudaFree(dout);
  return ok;
}

float time_cfg(int M, int N, int K, int tiles, int warps, int kwarps, int stages, int copies, int** dq, uint16_t** ds, uint8_t** dz,
               uint16_t* dx, uint16_t* dout, int iters, int aw = 0) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < copies; ++i)
    if (svo_w4a16_linear(0, dx, dq[i], ds[i], dz[i], nullptr, dout, M, N, K, 128, K, 0, tiles, warps, kwarps, stages, aw, 0, 0)) return -1;
  cudaEventRecord(a);
  for (int it = 0; it < iters; ++it) { int i = it % copies;
    svo_w4a16_linear(0, dx, dq[i], ds[i], dz[i], nullptr, dout, M, N, K, 128, K, 0, tiles, warps, kwarps, stages, aw, 0, 0); }
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  return ms * 1000 / iters;
}

int main(int argc, char** argv) {
  if (argc == 9) {  // one config: ./h one N K M tiles warps kwarps stages (for ncu)
    int N = atoi(argv[2]), K = atoi(argv[3]), M = atoi(argv[4]);
    int copies = 8;
    std::vector<int*> dq(copies); std::vector<uint16_t*> ds(copies); std::vector<uint8_t*> dz(copies);
    for (int i = 0; i < copies; ++i) {
      CK(cudaMalloc(&dq[i], (size_t)N * K / 2)); CK(cudaMalloc(&ds[i], (size_t)(K / 128) * N * 2)); CK(cudaMalloc(&dz[i], (size_t)(K / 128) * N));
      CK(cudaMemset(dq[i], 0x5A, (size_t)N * K / 2)); CK(cudaMemset(ds[i], 0x3C, (size_t)(K / 128) * N * 2)); CK(cudaMemset(dz[i], 3, (size_t)(K / 128) * N));
    }
    uint16_t *dx, *dout; CK(cudaMalloc(&dx, (size_t)M * K * 2)); CK(cudaMalloc(&dout, (size_t)M * N * 2));
    float us = time_cfg(M, N, K, atoi(argv[5]), atoi(argv[6]), atoi(argv[7]), atoi(argv[8]), copies, dq.data(), ds.data(), dz.data(), dx, dout, 8);
    printf("one: %.2f us\n", us);
    return 0;
  }
  std::mt19937 rng(7);
  bool all = true;
  Prob probs[] = {{1, 4608, 3584, 128, "qkv"}, {3, 1032, 384, 128, "odd"}, {8, 3584, 1280, 256, "g256"},
                  {16, 520, 640, 640, "m16"}, {11, 2048, 1024, 128, "m11"}, {1, 64, 128, 128, "tiny"},
                  {5, 24, 2560, 512, "n24"}};
  int cfgs[][4] = {{1, 8, 8, 4}, {2, 4, 2, 2}, {4, 4, 2, 4}, {2, 1, 1, 6}, {1, 8, 4, 2}, {4, 3, 3, 4}, {1, 6, 2, 4}};
  for (auto& p : probs)
    for (auto& c : cfgs)
      for (int aw : {0, 1})  // aw (weights as the MMA's A operand): pairs of tiles, M <= 8
        if (!aw || (c[0] >= 2 && p.M <= 8)) all &= check<__nv_bfloat16>(0, p, c[0], c[1], c[2], c[3], (c[1] & 1) == 0, rng, aw);
  for (auto& c : cfgs) all &= check<__half>(1, probs[2], c[0], c[1], c[2], c[3], true, rng);
  all &= check<__half>(1, probs[3], 2, 8, 2, 4, false, rng);
  printf(all ? "ALL OK\n" : "SOME WRONG\n");
  if (argc < 2) return all ? 0 : 1;
  // timing: Qwen2.5-7B layer shapes, bf16, rotating copies (> 200 MB per shape: never L2-resident)
  Prob shapes[] = {{1, 4608, 3584, 128, "qkv"}, {1, 3584, 3584, 128, "o"}, {1, 37888, 3584, 128, "gate_up"},
                   {1, 3584, 18944, 128, "down"}};
  int Ms[] = {1, 8};
  for (int M : Ms) for (auto& p : shapes) {
    int N = p.N, K = p.K;
    size_t wbytes = (size_t)N * K / 2 + (size_t)(K / 128) * N * 3;
    int copies = std::max(2, (int)(400e6 / wbytes));
    std::vector<int*> dq(copies); std::vector<uint16_t*> ds(copies); std::vector<uint8_t*> dz(copies);
    for (int i = 0; i < copies; ++i) {
      CK(cudaMalloc(&dq[i], (size_t)N * K / 2)); CK(cudaMalloc(&ds[i], (size_t)(K / 128) * N * 2)); CK(cudaMalloc(&dz[i], (size_t)(K / 128) * N));
      CK(cudaMemset(dq[i], 0x5A, (size_t)N * K / 2)); CK(cudaMemset(ds[i], 0x3C, (size_t)(K / 128) * N * 2)); CK(cudaMemset(dz[i], 3, (size_t)(K / 128) * N));
    }
    uint16_t *dx, *dout; CK(cudaMalloc(&dx, (size_t)M * K * 2)); CK(cudaMalloc(&dout, (size_t)M * N * 2));
    CK(cudaMemset(dx, 0x3C, (size_t)M * K * 2));
    float best = 1e9; int bt = 0, bw = 0, bk = 0, bs = 0, ba = 0;
    int wk[][2] = {{4, 1}, {4, 2}, {4, 4}, {8, 1}, {8, 2}, {8, 4}, {8, 8}, {2, 1}, {2, 2}, {1, 1}};
    for (int tiles : {1, 2, 4}) for (auto& w : wk) for (int stages : {2, 4, 8}) for (int aw : {0, 1}) {
      if (smem_bytes_host(tiles, stages, w[0], M) > 227 * 1024 || (aw && (tiles < 2 || M > 8))) continue;
      float us = time_cfg(M, N, K, tiles, w[0], w[1], stages, copies, dq.data(), ds.data(), dz.data(), dx, dout, 100, aw);
      if (us < 0) { printf("fail %d %d %d %d %d\n", tiles, w[0], w[1], stages, aw); continue; }
      printf("  cfg M=%d %s tiles=%d warps=%d/%d stages=%d aw=%d %.2f us %.2f TB/s\n", M, p.name, tiles, w[0], w[1], stages,
             aw, us, wbytes / us / 1e6);
      if (us < best) { best = us; bt = tiles; bw = w[0]; bk = w[1]; bs = stages; ba = aw; }
    }
    printf("TIME M=%d %-8s N=%5d K=%5d best %.2f us (%.2f TB/s) tiles=%d warps=%d/%d stages=%d aw=%d\n", M, p.name,
           N, K, best, wbytes / best / 1e6, bt, bw, bk, bs, ba);
    for (int i = 0; i < copies; ++i) { cudaFree(dq[i]); cudaFree(ds[i]); cudaFree(dz[i]); }
    cudaFree(dx); cudaFree(dout);
  }
  return all ? 0 : 1;
}
