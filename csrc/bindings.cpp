// The Python module of the cuda backend (pybind11), built with the kernels by sparsevila_ops/_cuda.py. Tensors
// cross as data pointers (ints) and the stream as its handle, so nothing here or in the kernels needs torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "sparsevila_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int code, const char* what) {
  if (code != 0)
    throw std::runtime_error(std::string(what) + " failed: CUDA error " + std::to_string(code) + " (" +
                             svo_error_string(code) + ")");
}

}  // namespace

PYBIND11_MODULE(_sparsevila_cuda, m) {
  m.doc() = "CUDA kernels of sparsevila_ops' cuda backend (csrc/); host code: sparsevila_ops.cuda_decode";
  m.def(
      "decode_cluster",
      [](int dtype, int head_dim, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t lengths,
         std::uintptr_t out, std::uintptr_t lse, std::uintptr_t po, std::uintptr_t pl, float qk_scale,
         const std::array<int64_t, 12>& strides, std::uintptr_t timeline, int batch, int hk, int group, int hq,
         int num_chunks, int cluster, int warps, int pdl, std::uintptr_t stream) {
        check(svo_decode_cluster(dtype, head_dim, ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                 ptr<const int>(lengths), ptr<void>(out), ptr<float>(lse), ptr<float>(po),
                                 ptr<float>(pl), qk_scale, strides.data(), ptr<long long>(timeline), batch, hk,
                                 group, hq, num_chunks, cluster, warps, pdl, ptr<void>(stream)),
              "decode_attention (cuda backend) launch");
      },
      "Launch the cluster decode (+ the combine when num_chunks > cluster); see csrc/sparsevila_cuda.h. "
      "Raises RuntimeError with the CUDA error.",
      py::arg("dtype"), py::arg("head_dim"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"),
      py::arg("out"), py::arg("lse"), py::arg("po"), py::arg("pl"), py::arg("qk_scale"), py::arg("strides"),
      py::arg("timeline"), py::arg("batch"), py::arg("hk"), py::arg("group"), py::arg("hq"), py::arg("num_chunks"),
      py::arg("cluster"), py::arg("warps"), py::arg("pdl"), py::arg("stream"));
  m.def("decode_max_active_clusters", &svo_decode_max_active_clusters,
        "Clusters of `cluster` CTAs of the decode kernel resident at once (-1 on error).", py::arg("dtype"),
        py::arg("head_dim"), py::arg("cluster"), py::arg("warps"), py::arg("group"));
  m.def(
      "salience_lse",
      [](int dtype, int head_dim, std::uintptr_t q, std::uintptr_t k, std::uintptr_t cu_seqlens, std::uintptr_t lse2,
         float qk_scale2, const std::array<int64_t, 7>& strides, int num_segments, int max_rows, int heads,
         int num_summary, int poly_every, std::uintptr_t stream) {
        check(svo_salience_lse(dtype, head_dim, ptr<const void>(q), ptr<const void>(k), ptr<const int>(cu_seqlens),
                               ptr<float>(lse2), qk_scale2, strides.data(), num_segments, max_rows, heads,
                               num_summary, poly_every, ptr<void>(stream)),
              "visual_salience LSE pass (cuda backend) launch");
      },
      "Launch the salience LSE pass; see csrc/sparsevila_cuda.h. Raises RuntimeError with the CUDA error.",
      py::arg("dtype"), py::arg("head_dim"), py::arg("q"), py::arg("k"), py::arg("cu_seqlens"), py::arg("lse2"),
      py::arg("qk_scale2"), py::arg("strides"), py::arg("num_segments"), py::arg("max_rows"), py::arg("heads"),
      py::arg("num_summary"), py::arg("poly_every"), py::arg("stream"));
  m.def(
      "salience_colsum",
      [](int dtype, int head_dim, std::uintptr_t q, std::uintptr_t k, std::uintptr_t cu_seqlens, std::uintptr_t lse,
         float lse_scale, std::uintptr_t out, float qk_scale2, const std::array<int64_t, 7>& strides,
         int num_segments, int max_seqlen, int heads, int num_summary, int poly_every, std::uintptr_t stream) {
        check(svo_salience_colsum(dtype, head_dim, ptr<const void>(q), ptr<const void>(k),
                                  ptr<const int>(cu_seqlens), ptr<const float>(lse), lse_scale, ptr<float>(out),
                                  qk_scale2, strides.data(), num_segments, max_seqlen, heads, num_summary,
                                  poly_every, ptr<void>(stream)),
              "visual_salience column-sum pass (cuda backend) launch");
      },
      "Launch the salience column-sum pass; see csrc/sparsevila_cuda.h. Raises RuntimeError with the CUDA error.",
      py::arg("dtype"), py::arg("head_dim"), py::arg("q"), py::arg("k"), py::arg("cu_seqlens"), py::arg("lse"),
      py::arg("lse_scale"), py::arg("out"), py::arg("qk_scale2"), py::arg("strides"), py::arg("num_segments"),
      py::arg("max_seqlen"), py::arg("heads"), py::arg("num_summary"), py::arg("poly_every"), py::arg("stream"));
  m.def(
      "salience_wgmma_lse",
      [](int dtype, int head_dim, std::uintptr_t q, std::uintptr_t k, std::uintptr_t cu_seqlens, std::uintptr_t lse2,
         float qk_scale2, const std::array<int64_t, 7>& strides, int tokens, int num_segments, int max_rows,
         int heads, int num_summary, int poly_every, int consumers, int tile_n, std::uintptr_t stream) {
        check(svo_salience_wgmma_lse(dtype, head_dim, ptr<const void>(q), ptr<const void>(k),
                                     ptr<const int>(cu_seqlens), ptr<float>(lse2), qk_scale2, strides.data(), tokens,
                                     num_segments, max_rows, heads, num_summary, poly_every, consumers, tile_n,
                                     ptr<void>(stream)),
              "visual_salience LSE pass (cuda backend, wgmma kernel) launch");
      },
      "Launch the salience LSE pass on the Hopper kernel; see csrc/sparsevila_cuda.h. Raises RuntimeError with the "
      "CUDA error.",
      py::arg("dtype"), py::arg("head_dim"), py::arg("q"), py::arg("k"), py::arg("cu_seqlens"), py::arg("lse2"),
      py::arg("qk_scale2"), py::arg("strides"), py::arg("tokens"), py::arg("num_segments"), py::arg("max_rows"),
      py::arg("heads"), py::arg("num_summary"), py::arg("poly_every"), py::arg("consumers"), py::arg("tile_n"),
      py::arg("stream"));
  m.def(
      "salience_wgmma_colsum",
      [](int dtype, int head_dim, std::uintptr_t q, std::uintptr_t k, std::uintptr_t cu_seqlens, std::uintptr_t lse,
         float lse_scale, std::uintptr_t out, float qk_scale2, const std::array<int64_t, 7>& strides, int tokens,
         int num_segments, int max_seqlen, int heads, int num_summary, int poly_every, int consumers, int tile_n,
         std::uintptr_t stream) {
        check(svo_salience_wgmma_colsum(dtype, head_dim, ptr<const void>(q), ptr<const void>(k),
                                        ptr<const int>(cu_seqlens), ptr<const float>(lse), lse_scale, ptr<float>(out),
                                        qk_scale2, strides.data(), tokens, num_segments, max_seqlen, heads,
                                        num_summary, poly_every, consumers, tile_n, ptr<void>(stream)),
              "visual_salience column-sum pass (cuda backend, wgmma kernel) launch");
      },
      "Launch the salience column-sum pass on the Hopper kernel; see csrc/sparsevila_cuda.h. Raises RuntimeError "
      "with the CUDA error.",
      py::arg("dtype"), py::arg("head_dim"), py::arg("q"), py::arg("k"), py::arg("cu_seqlens"), py::arg("lse"),
      py::arg("lse_scale"), py::arg("out"), py::arg("qk_scale2"), py::arg("strides"), py::arg("tokens"),
      py::arg("num_segments"), py::arg("max_seqlen"), py::arg("heads"), py::arg("num_summary"),
      py::arg("poly_every"), py::arg("consumers"), py::arg("tile_n"), py::arg("stream"));
  m.def(
      "salience_sum_heads",
      [](std::uintptr_t part, std::uintptr_t out, int tokens, int heads, int64_t stride_ph, float inv_heads,
         std::uintptr_t stream) {
        check(svo_salience_sum_heads(ptr<const float>(part), ptr<float>(out), tokens, heads, stride_ph, inv_heads,
                                     ptr<void>(stream)),
              "visual_salience head sum (cuda backend) launch");
      },
      "out[j] = inv_heads * sum_h part[h, j] in head order; see csrc/sparsevila_cuda.h.", py::arg("part"),
      py::arg("out"), py::arg("tokens"), py::arg("heads"), py::arg("stride_ph"), py::arg("inv_heads"),
      py::arg("stream"));
  m.def("salience_block_rows", &svo_salience_block_rows, "Rows per salience CTA (grid sizing).");
  m.def(
      "w4a16_linear",
      [](int dtype, std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t zeros,
         std::uintptr_t bias, std::uintptr_t out, int M, int N, int K, int group, long long sx, int glu, int tiles,
         int warps, int kwarps, int stages, int aw, int pdl, std::uintptr_t stream) {
        check(svo_w4a16_linear(dtype, ptr<const void>(x), ptr<const int>(qweight), ptr<const void>(scales),
                               ptr<const uint8_t>(zeros), ptr<const void>(bias), ptr<void>(out), M, N, K, group, sx,
                               glu, tiles, warps, kwarps, stages, aw, pdl, ptr<void>(stream)),
              "w4a16_linear (cuda backend) launch");
      },
      "Launch the W4A16 GEMV; see csrc/sparsevila_cuda.h. Raises RuntimeError with the CUDA error.", py::arg("dtype"),
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("out"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group"), py::arg("sx"), py::arg("glu"), py::arg("tiles"),
      py::arg("warps"), py::arg("kwarps"), py::arg("stages"), py::arg("aw"), py::arg("pdl"), py::arg("stream"));
  m.def(
      "gemv",
      [](int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out, int M, int N, int K,
         long long sx, long long sw, int glu, std::uintptr_t norm, float eps, std::uintptr_t residual, int rows,
         int warps, int kwarps, int pdl, std::uintptr_t stream) {
        check(svo_gemv(dtype, ptr<const void>(x), ptr<const void>(w), ptr<const void>(bias), ptr<void>(out), M, N, K,
                       sx, sw, glu, ptr<const void>(norm), eps, ptr<const void>(residual), rows, warps, kwarps, pdl,
                       ptr<void>(stream)),
              "gemv (cuda backend) launch");
      },
      "Launch the dense GEMV; see csrc/sparsevila_cuda.h. Raises RuntimeError with the CUDA error.", py::arg("dtype"),
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("sx"), py::arg("sw"), py::arg("glu"), py::arg("norm"), py::arg("eps"), py::arg("residual"),
      py::arg("rows"), py::arg("warps"), py::arg("kwarps"), py::arg("pdl"), py::arg("stream"));
  m.def(
      "error_string", [](int code) { return std::string(svo_error_string(code)); },
      "cudaGetErrorString of a CUDA error code.", py::arg("code"));
}
