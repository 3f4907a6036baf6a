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
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _split_head_dim(d: int):
    """Head dim as a power-of-two main dot plus a smaller power-of-two tail dot (72 = 64 + 16 masked,
    80 = 64 + 16), so D is never padded to the next power of two; each part is at least 16 wide."""
    main = max(16, 1 << (d.bit_length() - 1))
    rest = d - main
    return main, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def _config(phase: str, max_seqlen: int, num_rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch parameters for ``phase`` ("lse" or "colsum"); a heuristic an autotuner can
    replace. ``num_rows`` is the number of summed rows per segment (max_seqlen, or c for summary rows).

    lse: BLOCK_M rows per program stream key blocks of BLOCK_N. colsum: BLOCK_N keys per program stream row
    blocks of BLOCK_M. Small segments get smaller tiles so masked padding does not cost exps.
    """
    small = max_seqlen <= 64
    if phase == "lse":
        if small or num_rows <= 64:
            return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(max(num_rows, 1)))), BLOCK_N=64,
                        num_warps=4, num_stages=3)
        # H100 sweep: 256-row tiles win on SigLIP frames (n = 729), 128 on long sequences.
        if max_seqlen <= 1024:
            return dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    bm = max(16, min(64, triton.next_power_of_2(max(num_rows, 1))))
    if small:
        return dict(BLOCK_M=bm, BLOCK_N=64, num_warps=4, num_stages=3)
    if max_seqlen <= 4096:  # H100 sweep: 256-key tiles amortize per-program cost on short segments
        return dict(BLOCK_M=bm, BLOCK_N=256, num_warps=8, num_stages=2)
    return dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3)


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


def visual_salience(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                    num_summary: int, lse: Optional[torch.Tensor], deterministic: bool,
                    out: torch.Tensor) -> None:
    """Triton launcher of ``torch.ops.sparsevila.visual_salience`` (see the module docstring for the math).

    ``q, k [T, H, D]`` with unit stride in D (other strides free), ``cu_seqlens`` int32 ``[S+1]``,
    ``out`` fp32 ``[T]`` (heads reduced) or ``[H, T]``. Extra memory: fp32 ``[H, T]`` LSE scratch when
    ``lse`` is None, and fp32 ``[H, T]`` partials when reducing heads deterministically. No host syncs.
    """
    T, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    if T == 0 or S == 0:
        return
    reduce_heads = out.dim() == 1
    d_main, d_tail = _split_head_dim(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = float(scale) * LOG2E
    num_rows = max_seqlen if num_summary == 0 else min(num_summary, max_seqlen)
    common = dict(D=D, D_MAIN=d_main, D_TAIL=d_tail, PREC=prec)

    if lse is None:
        lse_t = torch.empty(H, T, dtype=torch.float32, device=q.device)
        cfg = dict(_config("lse", max_seqlen, num_rows, D, q.dtype))
        n_row_blocks = triton.cdiv(max(num_rows, 1), cfg["BLOCK_M"])
        _salience_lse_kernel[(n_row_blocks * S, H)](
            q, k, cu_seqlens, lse_t, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cu_seqlens.stride(0),
            lse_t.stride(0), qk_scale, num_summary, n_row_blocks, **common, **cfg)
        lse_scale = 1.0
    else:
        lse_t, lse_scale = lse, LOG2E

    atomic = reduce_heads and not deterministic
    if not reduce_heads:
        target, inv_heads = out, 1.0
    elif atomic:
        out.zero_()
        target, inv_heads = out, 1.0 / H
    else:
        target, inv_heads = torch.empty(H, T, dtype=torch.float32, device=q.device), 1.0
    cfg = dict(_config("colsum", max_seqlen, num_rows, D, q.dtype))
    n_key_blocks = triton.cdiv(max(max_seqlen, 1), cfg["BLOCK_N"])
    _salience_colsum_kernel[(n_key_blocks * S, H)](
        q, k, cu_seqlens, lse_t, target, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cu_seqlens.stride(0),
        lse_t.stride(0), target.stride(0) if target.dim() == 2 else 0, qk_scale, lse_scale, inv_heads, num_summary,
        n_key_blocks, ATOMIC=atomic, **common, **cfg)
    if reduce_heads and deterministic:
        block = 1024
        _sum_heads_kernel[(triton.cdiv(T, block),)](target, out, T, H, target.stride(0), 1.0 / H, BLOCK=block)
