"""Triton kernel for W4A16 decode GEMV/GEMM: ``y[M, N] = x[M, K] @ W^T (+ bias)``, M <= 16, 4-bit weights.

Weight format (``sparsevila_ops.quant.W4Weight``): ``W[n, k] = (q[n, k] - zeros[k // G, n]) * scales[k // G, n]``
with ``q`` in [0, 15] and G (group size) a multiple of 128; ``scales [K/G, N]`` in x's dtype, ``zeros`` uint8
``[K/G, N]``; ``qweight`` int32 ``[N, K/8]``: in each block of 128 along K, word i (0..15) holds
``q[n, 128 b + 16 j + i]`` in bits ``[4j, 4j + 4)``. So nibble j of a block's 16 words is the contiguous K slice
``[16 j, 16 j + 16)``, and each slice becomes a tensor-core operand by elementwise ops only.

Grid ``(cdiv(N, BLOCK_N), SPLIT_K)``: program (p, s) owns rows ``[p BLOCK_N, (p+1) BLOCK_N)`` and split s of the
K/128 blocks. Per block it loads the rows' 16 words (64 contiguous bytes per row) and, per slice j,

    v = bitcast16(MAGIC_BITS | nibble_j) = MAGIC + q         (bf16: 0x4300 = 128, fp16: 0x6400 = 1024: the
                                                              nibble fills the mantissa bits of spacing 1)
    a += v @ x[:, slice]^T                                    (tensor cores, x's rows padded to 16, fp32)

then ``acc += s * (a - (MAGIC + z) * sum_k x[:, block])`` = ``sum_k x_k (q_k - z) s`` over the block: no float
op per weight. Products are exact; the fp32 sums carry MAGIC * sum x, which costs ~MAGIC / |q - z| times the
rounding of a plain fp32 dot (~1e-5 relative), far below the output's rounding.

SPLIT_K == 1 writes y (+ bias) in x's dtype; otherwise each program writes fp32 partials ``[SPLIT_K, M, N]`` and
``_reduce_kernel`` sums them in split order (deterministic), adds the bias and casts. With PDL (Hopper) each
kernel waits in ``griddepcontrol.wait`` before reading anything and lets its dependent launch at once.

The config (BLOCK_N, SPLIT_K, warps, stages) comes through the autotune seam: ``W4A16`` looks it up (tuned tables,
else ``_default``); ``launch`` runs the kernels with an explicit one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._device import sm_count, use_pdl
from ..autotune import Tunable, gpu_name
from ..reference import glu_rounded

PACK_K = 128  # K elements per packing block: 16 int32 words, 8 nibbles each (the kernel's 8 x 16)
BLOCK_M = 16  # x rows per tensor-core tile (the kernel serves M <= BLOCK_M)
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}  # bits, value


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, M, N, NUM_BLOCKS, BLOCKS_PER_GROUP,
                  sx, so, MAGIC_BITS: tl.constexpr, MAGIC_VAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    if PDL:  # x (and the output buffers) may be written by the previous kernel
        gdc_wait()
        gdc_launch_dependents()
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mrow = rows < N
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    words = tl.arange(0, 16)
    kk = tl.arange(0, 16)
    dt = x_ptr.dtype.element_ty
    per_split = tl.cdiv(NUM_BLOCKS, SPLIT_K)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, NUM_BLOCKS)
    qw_rows = qw_ptr + rows.to(tl.int64)[:, None] * (NUM_BLOCKS * 16) + words[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for blk in range(lo, hi):
        qw = tl.load(qw_rows + blk * 16, mask=mrow[:, None], other=0, eviction_policy="evict_first")
        g = blk // BLOCKS_PER_GROUP
        s = tl.load(s_ptr + g * N + rows, mask=mrow, other=0.0, eviction_policy="evict_first").to(tl.float32)
        z = tl.load(z_ptr + g * N + rows, mask=mrow, other=0, eviction_policy="evict_first").to(tl.float32)
        a = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        xsum = tl.zeros([BLOCK_M], tl.float32)
        for j in tl.static_range(8):
            xt = tl.load(x_ptr + m[None, :] * sx + ((blk * 8 + j) * 16 + kk)[:, None], mask=mm[None, :],
                         other=0.0, eviction_policy="evict_last")  # [16 k, BLOCK_M] = x[:, slice]^T
            v = (((qw >> (4 * j)) & 0xF) | MAGIC_BITS).to(tl.int16).to(dt, bitcast=True)
            a = tl.dot(v, xt, a)
            xsum += tl.sum(xt.to(tl.float32), 0)
        acc += s[:, None] * (a - (z + MAGIC_VAL)[:, None] * xsum[None, :])
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=mrow, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + m[None, :] * so + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=mrow[:, None] & mm[None, :])
    else:
        tl.store(part_ptr + (split * M + m[None, :]) * N + rows[:, None], acc, mask=mrow[:, None] & mm[None, :])


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, so, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``out[m, cols] = sum_s part[s, m, cols] (+ bias)``, summed in split order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    sp = tl.arange(0, BLOCK_S)
    mc = cols < N
    parts = tl.load(part_ptr + (sp[:, None] * M + m) * N + cols[None, :], mask=(sp < SPLIT_K)[:, None] & mc[None, :],
                    other=0.0)
    y = tl.sum(parts, 0)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * so + cols, y.to(out_ptr.dtype.element_ty), mask=mc)


class W4Key(NamedTuple):
    gpu: str
    dtype: torch.dtype  # x's (and the scales')
    M: int  # rows of x (the decode batch)
    N: int  # W's rows (out_features; glu: twice the outputs)
    K: int  # in_features
    group: int  # group size (K elements per scale / zero)
    sms: int


def _key(x, qweight, scales, zeros, bias, glu, out) -> tuple:
    M, K = x.shape
    device = x.device
    return gpu_name(device), x.dtype, M, qweight.shape[0], K, K // max(1, scales.shape[0]), sm_count(device)


def _default(key: W4Key) -> dict:
    """Tiles of 128 rows (64 for N <= 2048), 4 warps, 3 stages; K split in powers of two up to 16 while each split
    keeps >= 3 blocks of 128 and the grid <= 12 programs per SM. Qwen2.5-7B on 132 SMs: qkv 4608x3584 and o
    3584x3584 split 8, gate_up 37888x3584 split 4, down 3584x18944 split 16. On the H200 over 32 W4A16 GEMVs of 7B
    and 1.5B decoders at batch 1-8 this was within 1.01x of the best config of the space (geomean; worst 1.14x),
    where the heuristic before (64-row tiles, split until >= 2 programs per SM, 4 stages) was 1.29x
    (``bench/NOTES.md``)."""
    block_n = 128 if key.N > 2048 else 64
    tiles = triton.cdiv(key.N, block_n)
    blocks = key.K // PACK_K
    split = 1
    while split < 16 and blocks >= 3 * 2 * split and tiles * 2 * split <= 12 * key.sms:
        split *= 2
    return {"BLOCK_N": block_n, "SPLIT_K": split, "num_warps": 4, "num_stages": 3}


def _space(key: W4Key) -> list:
    """The sweep of ``bench/gemv4.py --sweep``: BLOCK_N 32-128; SPLIT_K 1-16, each split >= 2 blocks of 128; 4 or
    8 warps; 3 or 5 stages (the default is one of them)."""
    blocks = key.K // PACK_K
    return [{"BLOCK_N": bn, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}
            for bn in (32, 64, 128) for split in (1, 2, 4, 8, 16) if blocks >= 2 * split for warps in (4, 8)
            for stages in (3, 5)]


def _resources(key: W4Key, cfg: dict):
    """Estimates. Shared memory: per stage, the rows' 16 words, scales and zeros, and the eight 16 x BLOCK_M
    slices of x. Registers: the two fp32 accumulators, the words, one slice of operands and x's slice, over the
    program's threads, + 32."""
    elem, bn = key.dtype.itemsize, cfg["BLOCK_N"]
    smem = cfg["num_stages"] * (bn * 64 + bn * (elem + 1) + 8 * 16 * BLOCK_M * elem)
    words = 2 * bn * BLOCK_M + bn * 16 + (bn * 16 + 16 * BLOCK_M) * elem // 4
    return smem, 32 + words // (32 * cfg["num_warps"])


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bias: torch.Tensor | None, glu: bool, out: torch.Tensor, cfg: dict) -> None:
    """Run the kernel with an explicit config ``{BLOCK_N, SPLIT_K, num_warps, num_stages}`` (shapes as in the
    module doc; ``x [M, K]`` with unit column stride, ``out [M, N]`` contiguous). glu: the kernel writes an fp32
    ``[M, 2N]`` buffer, then ``reference.glu_rounded`` (this portable backend has no fused epilogue)."""
    M, K = x.shape
    N = qweight.shape[0]
    if M == 0 or N == 0:
        return
    if glu:
        y = torch.empty(M, N, dtype=torch.float32, device=x.device)
        launch(x, qweight, scales, zeros, bias, False, y, cfg)
        glu_rounded(y, out)
        return
    num_blocks = K // PACK_K
    bits, val = MAGIC[x.dtype]
    pdl = use_pdl(x.device)
    launch_kw = {"launch_pdl": True} if pdl else {}
    split = cfg["SPLIT_K"]
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else out
    _w4a16_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split)](
        x, qweight, scales, zeros, b, out, part, M, N, num_blocks, num_blocks // scales.shape[0],
        x.stride(0), out.stride(0), MAGIC_BITS=bits, MAGIC_VAL=val, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=BLOCK_M, PDL=pdl, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch_kw)
    if split > 1:
        block = 256
        _reduce_kernel[(triton.cdiv(N, block), M)](
            part, b, out, M, N, out.stride(0), HAS_BIAS=bias is not None, SPLIT_K=split,
            BLOCK_S=triton.next_power_of_2(split), BLOCK=block, PDL=pdl, num_warps=4, **launch_kw)


W4A16 = Tunable("w4a16_linear", "triton", key=_key, key_type=W4Key, space=_space, default=_default, launch=launch,
                warmup=Tunable.triton_warmup(launch), resources=_resources, buckets=("M", "N", "K"))


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, glu: bool, out: torch.Tensor) -> None:
    """``out = x @ W^T (+ bias)`` (glu: ``silu(gate) * up`` of it) with the looked-up config (the
    ``sparsevila_quant::w4a16_linear`` op)."""
    W4A16(x, qweight, scales, zeros, bias, glu, out)
