"""Triton kernel for the dense decode GEMV ``y[M, N] = x[M, K] @ W^T (+ bias)``, M <= 8 (the ``gemv`` op).

With ``GLU`` (a gated MLP's fused gate/up projection: W ``[2N, K]``, bias ``[2N]``) the output is
``round(round(silu(round(y_gate))) * round(y_up))``, rounded to x's dtype at each step as the unfused path stores
it. Program p owns output rows ``[p BLOCK_N, (p+1) BLOCK_N)`` (glu: their gate rows and the up rows N further) and
walks K in ``BLOCK_K`` slices: ``acc += x[:, slice] @ W[rows, slice]^T`` on tensor cores, x's rows padded to 16,
fp32 accumulation; + bias, cast to x's dtype. With PDL (Hopper) it waits in ``griddepcontrol.wait`` before reading
anything and lets its dependent launch at once. This is the portable backend of the op; the cuda backend
(``csrc/gemv.cu``) is preferred where it runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._device import smem_per_block_of_gpu, use_pdl
from ..autotune import Tunable
from ..linear import GemvKey, gemv_key
from ..reference import composed_folds

BLOCK_M = 16  # x rows per tensor-core tile (the op serves M <= 8)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sx, sw, so, GLU: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # x (and out) may be written by the previous kernel
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mrow = rows < N
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    kk = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * sw
    x_rows = x_ptr + m.to(tl.int64)[:, None] * sx
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        mk = k < K
        xs = tl.load(x_rows + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=mrow[:, None] & mk[None, :], other=0.0, eviction_policy="evict_first")
        acc = tl.dot(xs, tl.trans(w), acc)
        if GLU:
            wu = tl.load(w_rows + N * sw + k[None, :], mask=mrow[:, None] & mk[None, :], other=0.0,
                         eviction_policy="evict_first")
            up = tl.dot(xs, tl.trans(wu), up)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=mrow, other=0.0).to(tl.float32)[None, :]
        if GLU:
            up += tl.load(b_ptr + N + rows, mask=mrow, other=0.0).to(tl.float32)[None, :]
    if GLU:
        g = acc.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        acc = act * up.to(dt).to(tl.float32)
    tl.store(out_ptr + m[:, None] * so + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & mrow[None, :])


def _default(key: GemvKey) -> dict:
    """Tiles of 32 rows, 4 warps; K in slices of 256 over 5 stages (glu, two weight tiles per slice: 128 over 3), the
    stages cut to what the GPU's shared memory holds. The bytes in flight per program decide, not the programs per
    SM: on the H200 this config was within 1.04x of the best of the 36-config space (geomean; worst 1.17x) over 30
    GEMVs of 7B and 1.5B decoders at batch 1-8, where 16-row tiles, 128-wide slices and 3 stages (the heuristic
    before, for >= 4 programs per SM) were 1.41x (``bench/NOTES.md``)."""
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3} if key.glu else \
        {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 5}
    smem = smem_per_block_of_gpu(key.gpu)
    while smem is not None and cfg["num_stages"] > 2 and _resources(key, cfg)[0] > smem:
        cfg["num_stages"] -= 1
    if smem is not None and _resources(key, cfg)[0] > smem:
        cfg["BLOCK_K"] = 64
    return cfg


def _space(key: GemvKey) -> list:
    """BLOCK_N 16-64 x BLOCK_K 64-256 x 4 or 8 warps x 3 or 5 stages."""
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
            for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (4, 8) for s in (3, 5)]


def _resources(key: GemvKey, cfg: dict):
    """Estimates. Shared memory: per stage, the W tile (glu: two) and x's slice. Registers: the accumulators and
    one stage of operands over the program's threads, + 32."""
    elem, bn, bk = key.dtype.itemsize, cfg["BLOCK_N"], cfg["BLOCK_K"]
    w_tiles = 2 if key.glu else 1
    smem = cfg["num_stages"] * (w_tiles * bn + BLOCK_M) * bk * elem
    words = w_tiles * BLOCK_M * bn + (w_tiles * bn + BLOCK_M) * bk * elem // 4
    return smem, 32 + words // (32 * cfg["num_warps"])


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, glu: bool, out: torch.Tensor,
           cfg: dict) -> None:
    """Run the kernel with an explicit config ``{BLOCK_N, BLOCK_K, num_warps, num_stages}`` (``x [M, K]``, unit
    column stride; ``weight [N, K]`` (glu: ``[2N, K]``) unit column stride; ``out [M, N]`` unit column stride)."""
    M, N, K = x.shape[0], out.shape[1], weight.shape[1]
    if M == 0 or N == 0:
        return
    pdl = use_pdl(x.device)
    _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x, weight, bias if bias is not None else out, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        GLU=bool(glu), HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_M=BLOCK_M, PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if pdl else {}))


GEMV = Tunable("gemv", "triton", key=gemv_key, key_type=GemvKey, space=_space, default=_default, launch=launch,
               warmup=Tunable.triton_warmup(launch), resources=_resources, buckets=("M", "N", "K"))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, glu: bool,
         norm_weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ W^T (+ bias)`` (glu: ``silu(gate) * up`` of it) with the looked-up config (the ``sparsevila::gemv``
    op); folds composed around the kernel (``reference.composed_folds``; without folds, the kernel alone)."""
    composed_folds(GEMV, x, weight, bias, glu, norm_weight, eps, residual, out)
