"""Streaming-softmax salience (docs/ops.md, visual_salience): mean attention each key receives inside its segment.

For segment ``[a, b)``, rows ``R`` (all rows, or the first ``min(c, n)``), head ``h``::

    L2[h, i]  = log2 sum_j exp2(s2[i, j]),   s2[i, j] = scale * log2(e) * q[i, h] . k[j, h]
    out[h, j] = 1/|R| * sum_{i in R} exp2(s2[i, j] - L2[h, i])             (per head, fp32 [H, T])
    out[j]    = 1/(H |R|) * sum_h sum_{i in R} exp2(s2[i, j] - L2[h, i])   (heads reduced, fp32 [T])

Pass 1 (``_salience_lse_kernel``, only when no ``lse`` is given): one program per (row block, segment,
head) streams the segment's key blocks with an online max/sum and stores ``L2`` in an fp32 ``[H, T]``
scratch. Pass 2 (``_salience_colsum_kernel``): one program per (key block, segment, head) keeps its K tile
resident, streams the rows of ``R``, and sums ``P = exp2(s2 - L2)`` over rows in registers: one FMA + one
exp2 per score, no n x n buffer. A given natural-log ``lse`` is converted to log2 on load (one pass).

All segments, heads and blocks run in one launch per pass; programs past a segment's end exit at once.
Heads are reduced with ``tl.atomic_add`` by default; ``deterministic=True`` stores per-head partials and
sums them in a fixed order (``_sum_heads_kernel``), so results are bitwise reproducible.

Each pass is a Tunable of the autotune seam: ``SALIENCE_LSE`` (its own arguments: the LSE scratch is its
output) and ``SALIENCE_COLSUM`` (the op's arguments with an LSE, natural or log2, and the head reduction).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..autotune import Tunable, gpu_name
from ..salience import summary_rows

LOG2E = 1.4426950408889634


def _split_head_dim(d: int):
    """Head dim as a power-of-two main dot plus a smaller power-of-two tail dot (72 = 64 + 16 masked,
    80 = 64 + 16), so D is never padded to the next power of two; each part is at least 16 wide."""
    main = max(16, 1 << (d.bit_length() - 1))
    rest = d - main
    return main, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def _segment_block(cu_seqlens, stride_cu, n_blocks, num_summary):
    """Program axis 0 as (segment, block): the block index, the segment's token range [a, b) and the end of its
    summary rows R = [a, r_end) (all rows when num_summary == 0, else its first num_summary); both passes
    must agree on R."""
    pid = tl.program_id(0)
    seg = pid // n_blocks
    a = tl.load(cu_seqlens + seg * stride_cu)
    b = tl.load(cu_seqlens + (seg + 1) * stride_cu)
    return pid % n_blocks, a, b, tl.where(num_summary == 0, b, a + tl.minimum(num_summary, b - a))


@triton.jit
def _load_rows(base, rows, row_end, stride_t, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile ``[len(rows), BLOCK_D]`` of ``base[rows, d0:d0+BLOCK_D]`` (zeros past ``row_end`` and ``D``)."""
    d = d0 + tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + d[None, :]
    return tl.load(ptrs, mask=(rows < row_end)[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _lse_block(q_main, q_tail, k_base, k_rows, k_end, stride_kt, m_i, l_i, qk_scale,
               D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, PREC: tl.constexpr,
               MASK_KEYS: tl.constexpr):
    """Online max/sum update of ``(m_i, l_i)`` (log2 units) with one key block."""
    k_main = _load_rows(k_base, k_rows, k_end, stride_kt, 0, D, D_MAIN)
    s = tl.dot(q_main, tl.trans(k_main), input_precision=PREC)
    if D_TAIL > 0:
        k_tail = _load_rows(k_base, k_rows, k_end, stride_kt, D_MAIN, D, D_TAIL)
        s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=PREC)
    if MASK_KEYS:
        s = tl.where((k_rows < k_end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
    return m_new, l_i


@triton.jit
def _salience_lse_kernel(q, k, cu_seqlens, lse2, stride_qt, stride_qh, stride_kt, stride_kh, stride_cu,
                         stride_lh, qk_scale, num_summary, n_row_blocks,
                         D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Pass 1: ``lse2[h, i] = log2 sum_j exp2(qk_scale * q[i, h] . k[j, h])`` for the rows ``i`` of R."""
    blk, a, b, r_end = _segment_block(cu_seqlens, stride_cu, n_row_blocks, num_summary)
    h = tl.program_id(1).to(tl.int64)
    n = b - a
    row0 = a + blk * BLOCK_M
    if row0 >= r_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    q_base = q + h * stride_qh
    k_base = k + h * stride_kh
    q_main = _load_rows(q_base, rows, r_end, stride_qt, 0, D, D_MAIN)
    q_tail = q_main
    if D_TAIL > 0:
        q_tail = _load_rows(q_base, rows, r_end, stride_qt, D_MAIN, D, D_TAIL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    n_full = n // BLOCK_N
    for j in range(0, n_full):
        m_i, l_i = _lse_block(q_main, q_tail, k_base, a + j * BLOCK_N + cols, b, stride_kt, m_i, l_i, qk_scale,
                              D, D_MAIN, D_TAIL, PREC, False)
    if n_full * BLOCK_N < n:
        m_i, l_i = _lse_block(q_main, q_tail, k_base, a + n_full * BLOCK_N + cols, b, stride_kt, m_i, l_i,
                              qk_scale, D, D_MAIN, D_TAIL, PREC, True)
    tl.store(lse2 + h * stride_lh + rows, m_i + tl.math.log2(l_i), mask=rows < r_end)


@triton.jit
def _salience_colsum_kernel(q, k, cu_seqlens, lse, out, stride_qt, stride_qh, stride_kt, stride_kh, stride_cu,
                            stride_lh, stride_oh, qk_scale, lse_scale, inv_heads, num_summary, n_key_blocks,
                            D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                            ATOMIC: tl.constexpr):
    """Pass 2: ``out[h, j] (+)= inv_heads/|R| * sum_{i in R} exp2(qk_scale s[i, j] - lse_scale lse[h, i])``.

    ``ATOMIC``: heads accumulate into ``out[T]`` with atomic adds; else ``out[h, j]`` is stored."""
    blk, a, b, r_end = _segment_block(cu_seqlens, stride_cu, n_key_blocks, num_summary)
    h = tl.program_id(1).to(tl.int64)
    key0 = a + blk * BLOCK_N
    if key0 >= b:
        return
    keys = key0 + tl.arange(0, BLOCK_N)
    q_base = q + h * stride_qh
    k_base = k + h * stride_kh
    lse_base = lse + h * stride_lh
    k_main = _load_rows(k_base, keys, b, stride_kt, 0, D, D_MAIN)
    k_tail = k_main
    if D_TAIL > 0:
        k_tail = _load_rows(k_base, keys, b, stride_kt, D_MAIN, D, D_TAIL)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(a, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        # Rows past R get L2 = +inf, hence P = exp2(-inf) = 0: no per-score mask.
        l2 = tl.load(lse_base + rows, mask=rows < r_end, other=float("inf")) * lse_scale
        q_main = _load_rows(q_base, rows, r_end, stride_qt, 0, D, D_MAIN)
        s = tl.dot(k_main, tl.trans(q_main), input_precision=PREC)
        if D_TAIL > 0:
            q_tail = _load_rows(q_base, rows, r_end, stride_qt, D_MAIN, D, D_TAIL)
            s = tl.dot(k_tail, tl.trans(q_tail), s, input_precision=PREC)
        acc += tl.sum(tl.math.exp2(s * qk_scale - l2[None, :]), 1)
    val = acc * (inv_heads / (r_end - a).to(tl.float32))
    if ATOMIC:
        tl.atomic_add(out + keys, val, mask=keys < b, sem="relaxed")
    else:
        tl.store(out + h * stride_oh + keys, val, mask=keys < b)


@triton.jit
def _sum_heads_kernel(part, out, T, H, stride_ph, inv_heads, BLOCK: tl.constexpr):
    """``out[j] = inv_heads * sum_h part[h, j]``, heads added in a fixed order (deterministic)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < T
    acc = tl.zeros([BLOCK], tl.float32)
    for h in range(0, H):
        acc += tl.load(part + h * stride_ph + j, mask=mask, other=0.0)
    tl.store(out + j, acc * inv_heads, mask=mask)


class SalienceKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    H: int
    S: int  # segments
    n: int  # max_seqlen
    rows: int  # summed rows per segment: n, or num_summary
    atomic: bool  # heads reduced with atomics (the column-sum pass; False for the LSE pass)


def _lse_key(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse2) -> tuple:
    _, H, D = q.shape
    return (gpu_name(q.device), q.dtype, D, H, cu_seqlens.shape[0] - 1, max_seqlen,
            summary_rows(max_seqlen, num_summary), False)


def _colsum_key(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, lse_log2, deterministic, out) -> tuple:
    _, H, D = q.shape
    return (gpu_name(q.device), q.dtype, D, H, cu_seqlens.shape[0] - 1, max_seqlen,
            summary_rows(max_seqlen, num_summary), out.dim() == 1 and not deterministic)


def _narrow_unmasked(D: int) -> bool:
    """Head dims whose tiles hold at most 96 columns, none masked (64, 80 = 64 + 16, 96 = 64 + 32): on these the
    H200 runs 128-row (or 128-key) tiles with 4 warps and 3 stages fastest; 72 (64 + 16 with 8 masked) and 128 take
    the 256-wide tiles."""
    return D % 16 == 0 and sum(_split_head_dim(D)) <= 96


def _lse_default(key: SalienceKey) -> dict:
    """BLOCK_M rows per program stream key blocks of BLOCK_N; short segments or few summary rows get row tiles
    no taller than the rows (masked padding costs exps). Segments up to 1024 tokens: 128-row tiles, 4 warps,
    3 stages at narrow unmasked head dims (H200, D 64 / 80 / 96: 1.11-1.19x over 256-row tiles), 256 rows
    otherwise (H100 sweep: they win on SigLIP frames, n = 729, at D 72); longer: 128 rows, 8 warps, 256 at D 72
    (H200: 1.29x)."""
    if key.n <= 64 or key.rows <= 64:
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(max(key.rows, 1)))), BLOCK_N=64,
                    num_warps=4, num_stages=3)
    if key.n <= 1024 and _narrow_unmasked(key.D):
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if key.n <= 1024 or key.D % 16:
        return dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _colsum_default(key: SalienceKey) -> dict:
    """BLOCK_N keys per program stream row blocks of BLOCK_M (<= 64: taller tiles spill). Segments up to 4096
    tokens: 256-key tiles amortize the per-program cost (H100 sweep) at D 72 and 128; narrow unmasked head dims
    take 128-key tiles with 4 warps (H200, D 64 / 80 / 96: 1.0-1.24x; 3 stages up to 80 columns, 2 at 96), as do
    all longer segments (3 stages)."""
    bm = max(16, min(64, triton.next_power_of_2(max(key.rows, 1))))
    if key.n <= 64:
        return dict(BLOCK_M=bm, BLOCK_N=64, num_warps=4, num_stages=3)
    if key.n > 4096:
        return dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3)
    if _narrow_unmasked(key.D):
        return dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3 if sum(_split_head_dim(key.D)) <= 80 else 2)
    return dict(BLOCK_M=bm, BLOCK_N=256, num_warps=8, num_stages=2)


def _lse_space(key: SalienceKey) -> list:
    """The LSE tiles of ``python -m bench.figure3_salience --sweep`` (BLOCK_M, BLOCK_N, warps, stages)."""
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
            ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3),
             (128, 32, 8, 3), (256, 64, 8, 2))]


def _colsum_space(key: SalienceKey) -> list:
    """The column-sum tiles of ``python -m bench.figure3_salience --sweep`` (BLOCK_N, BLOCK_M, warps, stages)."""
    return [dict(BLOCK_N=n, BLOCK_M=m, num_warps=w, num_stages=s) for n, m, w, s in
            ((128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
             (64, 128, 4, 3), (128, 32, 4, 3), (256, 64, 8, 2))]


def _salience_resources(resident: str, streamed: str):
    """Estimates for a pass that keeps a tile of ``resident`` rows and streams tiles of ``streamed`` rows (LSE:
    q resident, k streamed; column sums: k resident, q streamed). Shared memory: the resident tile + one
    streamed tile per stage. Registers: the fp32 score tile and the resident tile over the threads, + 32."""
    def resources(key: SalienceKey, cfg: dict):
        d, elem = sum(_split_head_dim(key.D)), key.dtype.itemsize
        smem = (cfg[resident] + cfg["num_stages"] * cfg[streamed]) * d * elem
        words = cfg["BLOCK_M"] * cfg["BLOCK_N"] + cfg[resident] * d * elem // 4
        return smem, 32 + words // (32 * cfg["num_warps"])
    return resources


def _lse_pass(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse2, cfg) -> None:
    """Pass 1 into ``lse2`` fp32 ``[H, T]`` (log2 units; rows outside each segment's R are not written)."""
    T, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    if T == 0 or S == 0:
        return
    d_main, d_tail = _split_head_dim(D)
    n_row_blocks = triton.cdiv(max(summary_rows(max_seqlen, num_summary), 1), cfg["BLOCK_M"])
    _salience_lse_kernel[(n_row_blocks * S, H)](
        q, k, cu_seqlens, lse2, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cu_seqlens.stride(0),
        lse2.stride(0), float(scale) * LOG2E, num_summary, n_row_blocks, D=D, D_MAIN=d_main, D_TAIL=d_tail,
        PREC=_precision(q), **cfg)


def _colsum_pass(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, lse_log2, deterministic, out, cfg) -> None:
    """Pass 2 into ``out`` (fp32 ``[T]`` heads reduced, or ``[H, T]``) from ``lse`` (log2 units when
    ``lse_log2``, else natural), then the fixed-order head sum when deterministic."""
    T, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    if T == 0 or S == 0:
        return
    reduce_heads = out.dim() == 1
    atomic = reduce_heads and not deterministic
    if not reduce_heads:
        target, inv_heads = out, 1.0
    elif atomic:
        out.zero_()
        target, inv_heads = out, 1.0 / H
    else:
        target, inv_heads = torch.empty(H, T, dtype=torch.float32, device=q.device), 1.0
    d_main, d_tail = _split_head_dim(D)
    n_key_blocks = triton.cdiv(max(max_seqlen, 1), cfg["BLOCK_N"])
    _salience_colsum_kernel[(n_key_blocks * S, H)](
        q, k, cu_seqlens, lse, target, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cu_seqlens.stride(0),
        lse.stride(0), target.stride(0) if target.dim() == 2 else 0, float(scale) * LOG2E,
        1.0 if lse_log2 else LOG2E, inv_heads, num_summary, n_key_blocks, D=D, D_MAIN=d_main, D_TAIL=d_tail,
        PREC=_precision(q), ATOMIC=atomic, **cfg)
    if reduce_heads and deterministic:
        block = 1024
        _sum_heads_kernel[(triton.cdiv(T, block),)](target, out, T, H, target.stride(0), 1.0 / H, BLOCK=block)


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


SALIENCE_LSE = Tunable("visual_salience.lse", "triton", key=_lse_key, key_type=SalienceKey, space=_lse_space,
                       default=_lse_default, launch=_lse_pass, warmup=Tunable.triton_warmup(_lse_pass),
                       buckets=("S", "n", "rows"), resources=_salience_resources("BLOCK_M", "BLOCK_N"))
SALIENCE_COLSUM = Tunable("visual_salience.colsum", "triton", key=_colsum_key, key_type=SalienceKey,
                          space=_colsum_space, default=_colsum_default, launch=_colsum_pass,
                          warmup=Tunable.triton_warmup(_colsum_pass), buckets=("S", "n", "rows"),
                          resources=_salience_resources("BLOCK_N", "BLOCK_M"))


def visual_salience(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                    num_summary: int, lse: Optional[torch.Tensor], deterministic: bool,
                    out: torch.Tensor) -> None:
    """Triton launcher of ``torch.ops.sparsevila.visual_salience`` (see the module docstring for the math).

    ``q, k [T, H, D]`` with unit stride in D (other strides free), ``cu_seqlens`` int32 ``[S+1]``,
    ``out`` fp32 ``[T]`` (heads reduced) or ``[H, T]``. Extra memory: fp32 ``[H, T]`` LSE scratch when
    ``lse`` is None, and fp32 ``[H, T]`` partials when reducing heads deterministically. No host syncs.
    """
    T, H, _ = q.shape
    if T == 0 or cu_seqlens.shape[0] == 1:
        return
    if lse is None:
        lse2 = torch.empty(H, T, dtype=torch.float32, device=q.device)
        SALIENCE_LSE(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse2)
        SALIENCE_COLSUM(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse2, True, deterministic, out)
    else:
        SALIENCE_COLSUM(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, False, deterministic, out)
