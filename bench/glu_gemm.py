"""Experiment: a gated MLP's gate/up GEMM with ``silu(gate) * up`` in its epilogue (one Triton kernel), against
what ``enable`` runs today: one cuBLAS GEMM over ``[W_gate; W_up]`` (``F.linear``) and then
``triton_kernels.vision.silu_mul`` over the two halves of its output.

Why: at 128k visual tokens the Qwen2.5-VL-7B tower spends ~80 ms of E in the SiLU gate (32 calls, each at its byte
floor: read 2 x 524,288 x 3456 bf16, write half that) and its gate/up GEMM writes twice the activations the down
GEMM reads. E runs at the H200's 700 W power cap (bench/NOTES.md, "The GPU's clock and power per stage"), so the
bytes not moved are also joules not spent. A fused kernel writes only ``h``; it pays off only if its GEMM runs
near cuBLAS's rate.

    h = bf(bf(g / (1 + exp(-g))) * u),  g = bf(x W_gate^T + b_gate),  u = bf(x W_up^T + b_up)

(fp32 accumulation; each step rounded to x's dtype as cuBLAS's bias epilogue and ``silu_mul`` round), with
``w = [W_gate; W_up]`` of ``2N`` rows as the integration stores it (``integrations.fused``, ``GATE_UP``).

``python -m bench.glu_gemm [--quick]``: shapes of the Qwen2.5-VL-7B vision MLP (524,288 patches, K 1280, N 3456:
3420 padded to a multiple of 64) and the Qwen2.5-7B prefill MLP (32k tokens, K 3584, N 18944). Per shape: every
config of ``CONFIGS`` timed once (verified against the cuBLAS + ``silu_mul`` path first), then the best against
that path in interleaved graph replays (``common.time_interleaved``), with the GEMM's TFLOP/s.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.common import require_gpu, time_cuda, time_interleaved, verify, write_results
from sparsevila_ops.reference import linear_epilogue
from sparsevila_ops.triton_kernels import vision  # (importing the package applies the interpreter's workarounds)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): two fp32 accumulators of BLOCK_M x BLOCK_N per program
CONFIGS = [(128, 64, 64, 4, 4), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
           (64, 128, 64, 4, 4), (128, 64, 128, 8, 3), (256, 64, 64, 8, 3), (128, 128, 32, 8, 5)]
SHAPES = {"qwen2.5-vl vision MLP": (524288, 1280, 3456), "qwen2.5-7b prefill MLP": (32768, 3584, 18944)}
QUICK_SHAPES = {"qwen2.5-vl vision MLP, 64k patches": (65536, 1280, 3456)}
GROUP_M = 8  # programs along M that share a W tile column in L2


@triton.jit
def _glu_gemm_kernel(x, w, b, out, M, N, K, stride_xm, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP * n_n) * GROUP
    rows_in_group = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * n_n)) % rows_in_group
    pid_n = (pid % (GROUP * n_n)) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = x + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    g_ptr = w + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] of W_gate^T
    u_ptr = w + (rn[None, :] + N).to(tl.int64) * stride_wn + rk[:, None]  # the same of W_up^T, N rows further
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = rk + k0 < K
        a = tl.load(a_ptr, mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & (rn < N)[None, :]
        acc_g = tl.dot(a, tl.load(g_ptr, mask=wmask, other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(u_ptr, mask=wmask, other=0.0), acc_u)
        a_ptr += BLOCK_K
        g_ptr += BLOCK_K
        u_ptr += BLOCK_K
    if HAS_BIAS:
        acc_g += tl.load(b + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    dt = out.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    h = (act * acc_u.to(dt).to(tl.float32)).to(dt)
    tl.store(out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], h, mask=(rm < M)[:, None] & (rn < N)[None, :])


def glu_gemm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], cfg=CONFIGS[2]) -> torch.Tensor:
    """``silu(x W_gate^T + b_gate) * (x W_up^T + b_up)`` for ``x [M, K]`` (rows of any stride, columns contiguous),
    ``w [2N, K]`` contiguous (gate rows, then up rows), ``b [2N]`` or None; ``[M, N]`` in x's dtype."""
    M, K = x.shape
    if w.dim() != 2 or w.shape[0] % 2 or w.shape[1] != K or w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"x [M, K] and w [2N, K] need contiguous columns and w an even row count; got x "
                         f"{tuple(x.shape)} strides {x.stride()}, w {tuple(w.shape)} strides {w.stride()}")
    N = w.shape[0] // 2
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bm, bn, bk, warps, stages = cfg
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _glu_gemm_kernel[grid](x, w, b if b is not None else w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                           HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M,
                           num_warps=warps, num_stages=stages)
    return out


def enable_path(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """What ``enable`` runs: one GEMM over both halves, then ``silu_mul`` on the halves of its output."""
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    return vision.silu_mul(gate, up)


def reference(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 GEMM, then the GEMV ops' glu epilogue (``reference.linear_epilogue``: bias in fp32, each step rounded
    to x's dtype)."""
    out = torch.empty(x.shape[0], w.shape[0] // 2, dtype=x.dtype, device=x.device)
    linear_epilogue(F.linear(x.float(), w.float()), b, True, out)
    return out


def shape_rows(name: str, M: int, K: int, N: int, configs=CONFIGS, rounds: int = 10) -> List[Dict[str, object]]:
    """Every config timed once, then the best and the enable path interleaved."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(2 * N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5).contiguous()
    b = torch.randn(2 * N, device="cuda", dtype=torch.bfloat16, generator=g)
    want = enable_path(x, w, b)
    flops = 2.0 * M * K * 2 * N
    rows, best = [], None
    for cfg in configs:
        try:
            got = glu_gemm(x, w, b, cfg)
        except Exception as e:  # noqa: BLE001 - a config the compiler or the GPU refuses (shared memory)
            rows.append({"shape": name, "variant": f"fused {cfg}", "note": f"{type(e).__name__}"[:60]})
            continue
        verify(f"glu_gemm {cfg}", got.float(), want.float(), 1e-2)
        ms = time_cuda(lambda _: glu_gemm(x, w, b, cfg), warmup=2, iters=10)["median_ms"]
        rows.append({"shape": name, "variant": f"fused {cfg}", "median_ms": ms, "tflops": flops / ms / 1e9})
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        return rows
    t = time_interleaved(lambda _: enable_path(x, w, b), lambda _: glu_gemm(x, w, b, best[0]), 1, 2, rounds)
    gemm = time_cuda(lambda _: F.linear(x, w, b), warmup=2, iters=10)["median_ms"]
    rows += [{"shape": name, "variant": "cuBLAS GEMM alone (of the enable path)", "median_ms": gemm,
              "tflops": flops / gemm / 1e9},
             {"shape": name, "variant": "enable path: cuBLAS GEMM + silu_mul (interleaved)", "median_ms": t["a_ms"]},
             {"shape": name, "variant": f"fused {best[0]} (interleaved)", "median_ms": t["b_ms"],
              "tflops": flops / t["b_ms"] / 1e9, "speedup": t["a_ms"] / t["b_ms"], "paired_diff_ms": t["diff_ms"]}]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one smaller shape (64k patches)")
    a = p.parse_args(argv)
    if not require_gpu("bench.glu_gemm"):
        return 0
    rows = []
    with torch.no_grad():
        for name, (M, K, N) in (QUICK_SHAPES if a.quick else SHAPES).items():
            rows += shape_rows(name, M, K, N)
            torch.cuda.empty_cache()
    write_results("glu_gemm_quick" if a.quick else "glu_gemm", rows,
                  ["shape", "variant", "median_ms", "tflops", "speedup", "paired_diff_ms", "note"],
                  title="gate/up GEMM with silu(gate) * up in its epilogue vs cuBLAS GEMM + silu_mul (bf16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
