// Warpgroup tensor-core helpers (sm_90a; wgmma.mma_async): shared-memory matrix descriptors for K-major operands
// in the 128-byte and 32-byte swizzled layouts that TMA writes, and D = A B^T for a 64 x 128 or 64 x 64 fp32 tile
// with k = 16 (A and B both K-major: rows of A and of B are the rows of two row-major matrices sharing the k axis),
// A from shared memory (Wgmma64xN) or, at N = 64, from registers (WgmmaRs64x64).
//
// Accumulator layout (PTX ISA, "wgmma .m64nNk16 D fragment"): warp w of the warpgroup, lane l, holds
// d[4 i + 0, 1] = D[16 w + l / 4, 8 i + 2 (l % 4) + 0, 1] and d[4 i + 2, 3] = the same columns of row + 8, i < N / 8.
// Everything here needs sm_90a: callers compile it under __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace sparsevila {

enum class Swizzle : uint64_t { k128B = 1, k32B = 3 };  // the descriptor's layout-type field (bits 62-63)

// Descriptor of a K-major operand at shared address ``addr``: rows of ``row_bytes`` (128 or 32) in the matching
// swizzle, 8-row groups ``8 * row_bytes`` apart. ``addr`` is the start of a 1024-byte (128B) / 256-byte (32B)
// aligned swizzle atom plus a k offset of 32 bytes per k step inside it.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, Swizzle swizzle, uint32_t row_bytes) {
  uint64_t d = (addr & 0x3FFFF) >> 4;                      // start address, 16-byte units
  d |= uint64_t{1} << 16;                                 // leading byte offset: unused by swizzled K-major
  d |= static_cast<uint64_t>((8 * row_bytes) >> 4) << 32;  // stride byte offset: between 8-row groups
  d |= static_cast<uint64_t>(swizzle) << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Orders the compiler's uses of an accumulator register around the asynchronous wgmma (CUTLASS's
// warpgroup_fence_operand): the register is "rewritten" here, so reads cannot move above a preceding wait.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// The accumulator registers d[0..31] of a 64 x 64 fp32 tile as the asm operands %0..%31: their PTX list (without
// its closing brace) and their output constraints, shared by the 64 x 64 forms and the first half of 64 x 128.
#define SVO_D32_LIST                                                                                                   \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"                                          \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SVO_D32_OUTS                                                                                                   \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                    \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),              \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),            \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d (64 x 128 fp32) = A (64 x 16) B (128 x 16)^T + (accumulate ? d : 0), issued asynchronously (commit, then
// wait before reading d); T = __nv_bfloat16 or __half (TY: its PTX type).
#define SVO_WGMMA_64X128(TY)                                                                                           \
    asm volatile(                                                                                                      \
        "{\n"                                                                                                          \
        ".reg .pred p;\n"                                                                                              \
        "setp.ne.b32 p, %66, 0;\n"                                                                                     \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {\n"                                                \
        SVO_D32_LIST ",\n"                                                                                             \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"                            \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n"  \
        "}\n"                                                                                                          \
        : SVO_D32_OUTS,                                                                                                \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),      \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),      \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),      \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])       \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// d (64 x 64 fp32) = A (64 x 16) B (64 x 16)^T + (accumulate ? d : 0): the same on half the B rows (d[4 i + ...]
// for i < 8).
#define SVO_WGMMA_64X64(TY)                                                                                            \
    asm volatile(                                                                                                      \
        "{\n"                                                                                                          \
        ".reg .pred p;\n"                                                                                              \
        "setp.ne.b32 p, %34, 0;\n"                                                                                     \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {\n"                                                 \
        SVO_D32_LIST "}, %32, %33, p, 1, 1, 0, 0;\n"                                                                   \
        "}\n"                                                                                                          \
        : SVO_D32_OUTS                                                                                                 \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate))

// The 64 x N tile (N = 64 or 128) of d = A B^T (+ d), fp32, T = __nv_bfloat16 or __half.
template <typename T, int N>
struct Wgmma64xN {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16");
  static_assert(N == 64 || N == 128, "n = 64 or 128");
  static __device__ __forceinline__ void run(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    constexpr bool kHalf = std::is_same<T, __half>::value;
    if constexpr (N == 128) {
      if constexpr (kHalf) SVO_WGMMA_64X128("f16"); else SVO_WGMMA_64X128("bf16");
    } else {
      if constexpr (kHalf) SVO_WGMMA_64X64("f16"); else SVO_WGMMA_64X64("bf16");
    }
  }
};
#undef SVO_WGMMA_64X128
#undef SVO_WGMMA_64X64

// d (64 x 64 fp32) = A (64 x 16, in registers) B (64 x 16)^T + (accumulate ? d : 0): A from a[4] in the
// m16n8k16 A-fragment layout per warp (warp w: rows 16 w ..; a[0] rows l / 4, k 2 (l % 4) + 0, 1; a[1] rows + 8;
// a[2], a[3] the same at k + 8), as ldmatrix.x4 loads it; only B is read from shared memory.
#define SVO_WGMMA_RS_64X64(TY)                                                                                         \
    asm volatile(                                                                                                      \
        "{\n"                                                                                                          \
        ".reg .pred p;\n"                                                                                              \
        "setp.ne.b32 p, %37, 0;\n"                                                                                     \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {\n"                                                 \
        SVO_D32_LIST "}, "                                                                                             \
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"                                                                     \
        "}\n"                                                                                                          \
        : SVO_D32_OUTS                                                                                                 \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate))

template <typename T>
struct WgmmaRs64x64 {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16");
  static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
    if constexpr (std::is_same<T, __half>::value) SVO_WGMMA_RS_64X64("f16"); else SVO_WGMMA_RS_64X64("bf16");
  }
};
#undef SVO_WGMMA_RS_64X64
#undef SVO_D32_LIST
#undef SVO_D32_OUTS

}  // namespace sparsevila
