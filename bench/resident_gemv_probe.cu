// Probe (bench only): does a decode GEMV whose weight slice is copied into shared memory *before* its
// griddepcontrol.wait hide its weight stream under the latency-bound kernels before it (rope + attention before
// o_proj: DRAM idles ~9 us per layer in the bf16 (0.75, 0.95) step, bench/NOTES.md)?
// Build: nvcc -std=c++17 -O3 -arch=sm_90a -o resident_gemv_probe bench/resident_gemv_probe.cu
// Per layer of a CUDA graph of 28 layers, all launches under PDL:
//   qkv GEMV (csrc/gemv.cu, 4608 x 3584) -> idle kernel (stands for rope + attention: `idle_us` of spinning on
//   `idle_ctas` CTAs holding `idle_smem` bytes of shared memory; it lets its dependent launch at its start ("early")
//   or `late_us` before its end ("late", as the attention's combine does today)) -> o GEMV (3584 x 3584: csrc/gemv.cu,
//   or a resident kernel below with `rows` rows per CTA) -> idle 2.4 us (stands for the residual + RMSNorm).
// Resident kernels: v1 sums with fp32 FMAs (x staged in shared memory after the wait), v3 with mma.sync (W rows as
// the A operand, x as column 0 of B). Usage: resident_gemv_probe idle_us trigger_us idle_ctas idle_smem carveout
// (results and analysis: bench/results/h200/resident_gemv_probe/, bench/NOTES.md).
#include "../csrc/gemv.cu"
#include "../csrc/mbarrier.cuh"
#include "../csrc/mma_sync.cuh"

#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <cmath>
#include <algorithm>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

using bf16 = __nv_bfloat16;

// Timeline (ns, %globaltimer) per layer: [0] idle's first CTA start, [1] idle's last CTA end, [2] o's first CTA start,
// [3] o's last copy landed, [4] o's first return from the wait, [5] o's last CTA end, [6] o's last CTA start.
__device__ unsigned long long g_ts[64][8];
__device__ long long g_cyc[512][4];  // layer 14, per CTA (v1): clock64 after the wait, x staged + copy landed, loop, end
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__global__ void idle_kernel(long long cycles, long long late_cycles, int early, float* sink, int layer) {
  if (layer >= 0 && threadIdx.x == 0) atomicMin(&g_ts[layer][0], now_ns());
  if (early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const long long t0 = clock64();
  if (!early) {
    while (clock64() - t0 < cycles - late_cycles) {}
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  while (clock64() - t0 < cycles) {}
  if (threadIdx.x == 0) sink[blockIdx.x] = (float)blockIdx.x;  // the dynamic shared memory is only held
  if (layer >= 0 && threadIdx.x == 0) atomicMax(&g_ts[layer][1], now_ns());
}

// Thread 0 stamps the CTA's start and arms the barrier for `bytes` of bulk copies; then the CTA syncs.
__device__ __forceinline__ void start_slice(uint32_t b, int layer, uint32_t bytes) {
  if (threadIdx.x == 0) {
    atomicMin(&g_ts[layer][2], now_ns());
    atomicMax(&g_ts[layer][6], now_ns());
    sparsevila::mbar_init(b, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    sparsevila::mbar_expect_tx(b, bytes);
  }
  __syncthreads();
}

// y[n] = sum_k W[n, k] x[k], M = 1: CTA b copies rows [b rows, (b + 1) rows) of W (contiguous) into shared memory by
// one bulk copy before the dependency wait; after it, each warp takes RPW rows: lane l reads 16-byte chunks
// l, l + 32, ... of x (registers) and of its rows (shared memory), warp shuffles sum.
template <int RPW>
__global__ void __launch_bounds__(256) resident_gemv(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                     bf16* __restrict__ out, int N, int K, int rows, int pdl, int layer, int copies) {
  extern __shared__ __align__(128) uint4 ws[];
  __shared__ __align__(8) uint64_t bar;
  const int n0 = blockIdx.x * rows, nr = min(rows, N - n0);
  const uint32_t b = sparsevila::smem_u32(&bar);
  start_slice(b, layer, (uint32_t)nr * K * 2);
  if (threadIdx.x < copies) {  // `copies` bulk copies of whole rows each
    const int per = (nr + copies - 1) / copies, r0 = threadIdx.x * per, r1 = min(nr, r0 + per);
    if (r0 < r1)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   :: "r"(sparsevila::smem_u32(ws + (long long)r0 * (K >> 3))), "l"(w + (long long)(n0 + r0) * K),
                      "r"((uint32_t)(r1 - r0) * K * 2), "r"(b) : "memory");
  }
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunks = K >> 3;
  const int r0 = warp * RPW;
  float acc[RPW][2] = {};
  if (threadIdx.x == 0) atomicMin(&g_ts[layer][4], now_ns());
  const long long c0 = clock64();
  uint4* xs = ws + (long long)rows * chunks;  // x staged after the weight slice: one round trip to L2
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) xs[c] = *reinterpret_cast<const uint4*>(x + 8 * c);
  __syncthreads();
  sparsevila::mbar_wait(b, 0);
  if (threadIdx.x == 0) atomicMax(&g_ts[layer][3], now_ns());
  const long long c1 = clock64();
#pragma unroll 2
  for (int c = lane; c < chunks; c += 32) {
    float h[8];
    unpack8<bf16>(xs[c], h);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      if (r0 + r >= nr) break;
      float f[8];
      unpack8<bf16>(ws[(long long)(r0 + r) * chunks + c], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e & 1] = fmaf(f[e], h[e], acc[r][e & 1]);
    }
  }
  const long long c2 = clock64();
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    float v = acc[r][0] + acc[r][1];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (lane == 0 && r0 + r < nr) out[n0 + r0 + r] = __float2bfloat16(v);
  }
  if (threadIdx.x == 0) atomicMax(&g_ts[layer][5], now_ns());
  if (layer == 14 && threadIdx.x == 0) {
    g_cyc[blockIdx.x][0] = c1 - c0; g_cyc[blockIdx.x][1] = c2 - c1; g_cyc[blockIdx.x][2] = clock64() - c2;
    g_cyc[blockIdx.x][3] = 1;
  }
}


// Version 3: tensor cores. The slice's rows (<= 32, two m16 tiles) land at a row stride of 2K + 16 bytes (ldmatrix
// without bank conflicts, one bulk copy per row); warp q takes the k16 steps q, q + 8, ...: A = 16 rows of W by
// ldmatrix, B = x in column 0 (lanes 0-3), mma.sync m16n8k16 into fp32; column 0 of the 8 warps' C summed in order.
__global__ void __launch_bounds__(256) resident_gemv3(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                      bf16* __restrict__ out, int N, int K, int rows, int pdl,
                                                      int layer) {
  extern __shared__ __align__(128) uint8_t wsm[];
  __shared__ __align__(8) uint64_t bar;
  __shared__ float red[8][32];
  const int n0 = blockIdx.x * rows, nr = min(rows, N - n0), rs = 2 * K + 16;
  const uint32_t b = sparsevila::smem_u32(&bar), base = sparsevila::smem_u32(wsm);
  start_slice(b, layer, (uint32_t)nr * K * 2);
  if (threadIdx.x < nr)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(base + threadIdx.x * rs), "l"(w + (long long)(n0 + threadIdx.x) * K), "r"(2 * K), "r"(b)
                 : "memory");
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  if (threadIdx.x == 0) atomicMin(&g_ts[layer][4], now_ns());
  const long long c0 = clock64();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, steps = K >> 4;
  constexpr int SPW = 32;  // k16 steps per warp (K <= 4096 here)
  uint32_t xb[SPW][2];
#pragma unroll
  for (int j = 0; j < SPW; ++j) {
    const int k0 = 16 * (warp + 8 * j);
    const bool on = lane < 4 && warp + 8 * j < steps;
    xb[j][0] = on ? *reinterpret_cast<const uint32_t*>(x + k0 + 2 * lane) : 0u;
    xb[j][1] = on ? *reinterpret_cast<const uint32_t*>(x + k0 + 8 + 2 * lane) : 0u;
  }
  float c[2][4] = {};
  sparsevila::mbar_wait(b, 0);
  if (threadIdx.x == 0) atomicMax(&g_ts[layer][3], now_ns());
  const long long c1 = clock64();
  const uint32_t lrow = base + (lane & 15) * rs + (lane >> 4) * 16;
  if (rows > 16) {  // two tiles: groups of 4 steps, their 8 ldmatrix issued before the 8 MMAs (2 chains per tile)
    float d[2][4] = {};
#pragma unroll
    for (int g = 0; g < SPW / 4; ++g) {
      uint32_t a[4][2][4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int t = 0; t < 2; ++t)
          if (warp + 8 * (4 * g + u) < steps) sparsevila::ldsm_x4(lrow + t * 16 * rs + 32 * (warp + 8 * (4 * g + u)), a[u][t]);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int t = 0; t < 2; ++t)
          if (warp + 8 * (4 * g + u) < steps) sparsevila::Mma<bf16>::run(u & 1 ? d[t] : c[t], a[u][t], xb[4 * g + u][0], xb[4 * g + u][1]);
    }
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[t][i] += d[t][i];
  } else {
#pragma unroll
    for (int j = 0; j < SPW; ++j) {
      if (warp + 8 * j >= steps) break;
      uint32_t a[4];
      sparsevila::ldsm_x4(lrow + 32 * (warp + 8 * j), a);
      sparsevila::Mma<bf16>::run(c[0], a, xb[j][0], xb[j][1]);
    }
  }
  const long long c2 = clock64();
  if ((lane & 3) == 0) {
#pragma unroll
    for (int t = 0; t < 2; ++t) { red[warp][16 * t + (lane >> 2)] = c[t][0]; red[warp][16 * t + 8 + (lane >> 2)] = c[t][2]; }
  }
  __syncthreads();
  if (threadIdx.x < nr) {
    float y = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) y += red[q][threadIdx.x];
    out[n0 + threadIdx.x] = __float2bfloat16(y);
  }
  if (threadIdx.x == 0) atomicMax(&g_ts[layer][5], now_ns());
  if (layer == 14 && threadIdx.x == 0) {
    g_cyc[blockIdx.x][0] = c1 - c0; g_cyc[blockIdx.x][1] = c2 - c1; g_cyc[blockIdx.x][2] = clock64() - c2;
    g_cyc[blockIdx.x][3] = 1;
  }
}

struct Variant { const char* name; int o_kind; int early; int rows; int copies; };  // o_kind 0: none, 1: gemv.cu, 2: resident

int main(int argc, char** argv) {
  const int L = 28, NQ = 4608, NO = 3584, K = 3584;
  const double idle_us = argc > 1 ? atof(argv[1]) : 9.0, late_us = argc > 2 ? atof(argv[2]) : 1.5;
  const int idle_ctas = argc > 3 ? atoi(argv[3]) : 52, idle_smem = argc > 4 ? atoi(argv[4]) : 48 * 1024;
  int dev = 0, clock_khz = 0, sms = 0;
  CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const double ghz = clock_khz / 1e6;
  printf("SMs %d, clock %.3f GHz; idle %.1f us (late trigger %.1f us before its end) on %d CTAs x %d B smem\n", sms,
         ghz, idle_us, late_us, idle_ctas, idle_smem);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uf(-1, 1);
  auto fill = [&](size_t n) {
    std::vector<bf16> h(n);
    for (auto& v : h) v = __float2bfloat16(uf(rng) * 0.05f);
    bf16* d; CK(cudaMalloc(&d, n * 2)); CK(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice)); return d;
  };
  std::vector<bf16*> wq(L), wo(L);
  for (int l = 0; l < L; ++l) { wq[l] = fill((size_t)NQ * K); wo[l] = fill((size_t)NO * K); }
  bf16* x = fill(K);
  bf16 *yq, *yo, *yref; float* sink;
  CK(cudaMalloc(&yq, NQ * 2)); CK(cudaMalloc(&yo, NO * 2)); CK(cudaMalloc(&yref, NO * 2));
  CK(cudaMalloc(&sink, 4096 * 4));
  CK(cudaFuncSetAttribute(idle_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  CK(cudaFuncSetAttribute(resident_gemv<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
  CK(cudaFuncSetAttribute(resident_gemv<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
  if (argc > 5 && atoi(argv[5])) {  // every kernel prefers the largest shared-memory carveout
    printf("carveout: max shared for the idle and gemv.cu kernels\n");
    CK(cudaFuncSetAttribute(idle_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    CK(cudaFuncSetAttribute(gemv_kernel<bf16, 2, 1, false, 0>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    CK(cudaFuncSetAttribute(gemv_kernel<bf16, 4, 1, false, 0>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  }
  cudaStream_t s; CK(cudaStreamCreate(&s));

  CK(cudaFuncSetAttribute(resident_gemv3, cudaFuncAttributeMaxDynamicSharedMemorySize, 32 * (2 * K + 16)));
  auto resident = [&](const bf16* w, int rows, int pdl, int layer, int copies) {
    if (copies == 0)
      return sparsevila::launch_pdl(resident_gemv3, dim3((NO + rows - 1) / rows), dim3(256),
                                    ((rows + 15) / 16) * 16 * (2 * K + 16), s, pdl, x, w, yo, NO, K, rows, pdl, layer);
    const int warps = rows <= 32 ? (rows + 3) / 4 : 8;  // RPW 4 up to 8 warps
    const int rpw = (rows + warps - 1) / warps;
    const int grid = (NO + rows - 1) / rows, smem = (rows + 1) * K * 2;
    if (rpw <= 4) return sparsevila::launch_pdl(resident_gemv<4>, dim3(grid), dim3(32 * warps), smem, s, pdl, x, w, yo, NO, K, rows, pdl, layer, copies);
    return sparsevila::launch_pdl(resident_gemv<8>, dim3(grid), dim3(32 * ((rows + 7) / 8)), smem, s, pdl, x, w, yo, NO, K, rows, pdl, layer, copies);
  };
  // correctness: resident vs gemv.cu on layer 0
  CK((cudaError_t)svo_gemv(0, x, wo[0], nullptr, yref, 1, NO, K, K, K, 0, nullptr, 0.f, nullptr, 4, 4, 2, 0, s));
  for (int rows : {14, 10, 27, 28, 1028, 1027, 1014, 1032}) {  // 10xx: v3 with xx rows
    CK(cudaMemsetAsync(yo, 0xFF, NO * 2, s));
    CK(resident(wo[0], rows % 1000, 0, 63, rows > 1000 ? 0 : 4));
    CK(cudaStreamSynchronize(s));
    std::vector<bf16> a(NO), r(NO);
    CK(cudaMemcpy(a.data(), yo, NO * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r.data(), yref, NO * 2, cudaMemcpyDeviceToHost));
    double err = 0, mx = 0;
    for (int i = 0; i < NO; ++i) { err = fmax(err, fabs((double)__bfloat162float(a[i]) - __bfloat162float(r[i]))); mx = fmax(mx, fabs((double)__bfloat162float(r[i]))); }
    printf("resident rows %d: max |diff| %.3g (max |y| %.3g)%s\n", rows, err, mx, (err <= 0.02 * mx && std::isfinite(err)) ? "" : "  MISMATCH");
  }

  const long long cyc = (long long)(idle_us * 1e3 * ghz), late = (long long)(late_us * 1e3 * ghz),
                  norm_cyc = (long long)(2.4e3 * ghz);
  std::vector<Variant> vs = {
      {"no o GEMV, late", 0, 0, 0, 0},           {"gemv.cu o, late (today)", 1, 0, 0, 0},
      {"resident 28 rows, late", 2, 0, 28, 1},   {"resident 28 rows, early", 2, 1, 28, 1},
      {"v3 (mma) 28 rows, late", 2, 0, 28, 0},   {"v3 (mma) 27 rows, late", 2, 0, 27, 0},
      {"v3 (mma) 32 rows, late", 2, 0, 32, 0},   {"v3 (mma) 28 rows, early", 2, 1, 28, 0},
  };
  printf("| variant | us per layer | o's share (us) |\n|---|---|---|\n");
  double none_late = 0, none_early = 0;
  for (auto& v : vs) {
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < L; ++l) {
      CK((cudaError_t)svo_gemv(0, x, wq[l], nullptr, yq, 1, NQ, K, K, K, 0, nullptr, 0.f, nullptr, 2, 4, 2, 1, s));
      CK(sparsevila::launch_pdl(idle_kernel, dim3(idle_ctas), dim3(128), idle_smem, s, 1, cyc, late, v.early, sink, l));
      if (v.o_kind == 1)
        CK((cudaError_t)svo_gemv(0, x, wo[l], nullptr, yo, 1, NO, K, K, K, 0, nullptr, 0.f, nullptr, 4, 4, 2, 1, s));
      if (v.o_kind == 2) CK(resident(wo[l], v.rows, 1, l, v.copies));
      CK(sparsevila::launch_pdl(idle_kernel, dim3(132), dim3(128), 0, s, 1, norm_cyc, 0LL, 0, sink, -1));
    }
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 5; ++i) CK(cudaGraphLaunch(ge, s));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int i = 0; i < 30; ++i) {
      CK(cudaEventRecord(e0, s)); CK(cudaGraphLaunch(ge, s)); CK(cudaEventRecord(e1, s));
      CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    {  // one more replay with fresh timestamps: layer 14's timeline relative to its idle kernel's start
      std::vector<unsigned long long> init(64 * 8);
      for (int i = 0; i < 64; ++i) for (int j = 0; j < 8; ++j) init[i * 8 + j] = (j == 0 || j == 2 || j == 4) ? ~0ull : 0ull;
      CK(cudaMemcpyToSymbol(g_ts, init.data(), init.size() * 8));
      CK(cudaGraphLaunch(ge, s)); CK(cudaStreamSynchronize(s));
      CK(cudaMemcpyFromSymbol(init.data(), g_ts, init.size() * 8));
      const unsigned long long* t = &init[14 * 8];
      auto rel = [&](int j) { return (t[j] == 0 || t[j] == ~0ull) ? -1.0 : ((double)(long long)(t[j] - t[0])) / 1e3; };
      std::vector<long long> cy(512 * 4, 0);
      CK(cudaMemcpyFromSymbol(cy.data(), g_cyc, cy.size() * 8));
      long long mx[3] = {0, 0, 0}, sm[3] = {0, 0, 0}; int n = 0;
      for (int i = 0; i < 512; ++i) if (cy[i * 4 + 3]) { ++n; for (int j = 0; j < 3; ++j) { mx[j] = std::max(mx[j], cy[i * 4 + j]); sm[j] += cy[i * 4 + j]; } }
      if (n) printf("v1 cycles per CTA (mean / max over %d): x staged + copy wait %lld / %lld, loop %lld / %lld, reduce + store %lld / %lld\n",
                    n, sm[0] / n, mx[0], sm[1] / n, mx[1], sm[2] / n, mx[2]);
      std::vector<long long> zero(512 * 4, 0); CK(cudaMemcpyToSymbol(g_cyc, zero.data(), zero.size() * 8));
      printf("timeline (us from idle start): idle end %.2f; o first start %.2f, last start %.2f, first wait done %.2f,"
             " last copy landed %.2f, last end %.2f\n", rel(1), rel(2), rel(6), rel(4), rel(3), rel(5));
    }
    const double us = ts[ts.size() / 2] * 1e3 / L;
    if (v.o_kind == 0) (v.early ? none_early : none_late) = us;
    const double base = v.early ? none_early : none_late;
    printf("| %s | %.2f | %.2f |\n", v.name, us, v.o_kind ? us - base : 0.0);
    CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
  }
  return 0;
}
