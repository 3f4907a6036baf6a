// Standalone probe of the H200's exp2 rate for the salience kernels' instruction mix (#15): what MUFU sustains when
// nothing else (no wgmma, no barriers, no shared-memory tiles) competes, as a function of warps per SM and of the
// independent chains per thread. It separates the cost of the column-sum loop's own arithmetic (FFMA -> MUFU ->
// FADD per score) from the cost of everything around it in csrc/salience_wgmma.cu.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/exp_rate_probe.cu -o exp_rate_probe
//   ./exp_rate_probe            # a table: mix, warps per SM, chains per thread, exp2/s, share of 16/clk/SM
//
// Mixes: "ffma+mufu+fadd" (the column sums: p = 2^(s c + nl), acc += p, with `chains` accumulators), "+fmnmx"
// (the LSE pass's running max over the same values), and "poly 1/k" (every k-th exp2 by csrc/exp2.cuh's polynomial
// on the FMA pipe, the rest on MUFU: the rate both units sustain together; "of peak" stays MUFU's 16/clk/SM).
// Each thread runs kIters x 32 exps over 32 values in registers (nl moves each iteration, one FADD per 32 exps); the
// grid fills every SM with the given warps (CTAs of 4 warps), timed with CUDA events.
#include <cstdio>

#include "../csrc/exp2.cuh"

constexpr int kIters = 4096;

// FFMA + ex2 + FADD into kChains accumulators per value; with kMax also a running max (FMNMX); with kPolyEvery > 0
// every kPolyEvery-th exp2 by the polynomial.
template <bool kMax, int kChains, int kPolyEvery = 0>
__global__ void exp_kernel(float* out, float c, float nl) {
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = -0.01f * (threadIdx.x % 7 + i);
  float acc[kChains], mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kChains; ++j) acc[j] = 0.f;
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      if constexpr (kMax) mx = fmaxf(mx, fmaf(s[i], c, nl));
      acc[i % kChains] += sparsevila::ex2_pair<kPolyEvery>(fmaf(s[i], c, nl), i);
    }
    nl -= 1e-7f;  // new exponents each iteration
  }
  float t = kMax ? mx : 0.f;  // stored, so that nothing is dead code
#pragma unroll
  for (int j = 0; j < kChains; ++j) t += acc[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = t;
}

// Prints one table row; false on a CUDA error.
template <bool kMax, int kChains, int kPolyEvery = 0>
bool run(const char* mix, int sms, int warps_per_sm, float* out, double clock_hz) {
  const int threads = 128, ctas = sms * (warps_per_sm * 32 / threads);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  exp_kernel<kMax, kChains, kPolyEvery><<<ctas, threads>>>(out, 0.9f, -1.5f);  // warm-up
  cudaEventRecord(a);
  const int reps = 5;
  for (int r = 0; r < reps; ++r) exp_kernel<kMax, kChains, kPolyEvery><<<ctas, threads>>>(out, 0.9f, -1.5f);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  const double exps = (double)reps * ctas * threads * kIters * 32, rate = exps / (ms * 1e-3);
  const double peak = 16.0 * sms * clock_hz;
  const cudaError_t e = cudaGetLastError();
  printf("| %s | %d | %d | %.3g | %.1f %% | %s |\n", mix, warps_per_sm, kChains, rate, 100.0 * rate / peak,
         cudaGetErrorString(e));
  return e == cudaSuccess;
}

int main() {
  int dev = 0, sms = 0, khz = 0, count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    fprintf(stderr, "exp_rate_probe: needs a CUDA GPU\n");
    return 1;
  }
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev);
  const double hz = khz * 1e3;
  float* out;
  cudaMalloc(&out, (size_t)sms * 64 * 32 * 4);
  // "of peak" is against the maximum SM clock; a clock that drops under load shows as a lower share.
  printf("SMs %d, max SM clock %.0f MHz, MUFU peak 16 exp2/clk/SM = %.3g /s\n\n", sms, hz / 1e6, 16.0 * sms * hz);
  printf("| mix | warps per SM | chains per thread | exp2 / s | of peak | status |\n|---|---|---|---|---|---|\n");
  bool ok = true;
  for (int w : {4, 8, 12, 16, 32}) {
    ok &= run<false, 2>("ffma+mufu+fadd", sms, w, out, hz);
    ok &= run<false, 4>("ffma+mufu+fadd", sms, w, out, hz);
    ok &= run<false, 8>("ffma+mufu+fadd", sms, w, out, hz);
    ok &= run<true, 4>("ffma+mufu+fadd+fmnmx", sms, w, out, hz);
  }
  for (int w : {8, 16, 32}) {
    ok &= run<false, 4, 8>("ffma+mufu+fadd, poly 1/8", sms, w, out, hz);
    ok &= run<false, 4, 4>("ffma+mufu+fadd, poly 1/4", sms, w, out, hz);
    ok &= run<false, 4, 3>("ffma+mufu+fadd, poly 1/3", sms, w, out, hz);
    ok &= run<false, 4, 2>("ffma+mufu+fadd, poly 1/2", sms, w, out, hz);
  }
  return ok ? 0 : 1;
}
