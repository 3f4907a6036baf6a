"""Op 2 in Triton: varlen FlashAttention2-style prefill (causal bottom-right, GQA) and query-aware relevance.

Segment s holds m query rows and n keys; row i sees key j in [0, n), with ``causal`` only j <= i + (n - m).

- ``_prefill_fwd_kernel``: grid (S * Hq, cdiv(max_seqlen_q, BLOCK_M)). One program = BLOCK_M rows of one query
  head. Online softmax in the log2 domain (``qk_scale = scale * log2 e``), fp32 statistics; KV blocks that
  every row of the tile sees run without masks, only the diagonal band and the ragged tail are masked. Query
  heads are the fast grid axis, so the G heads of a KV group (and all groups of one row block) run together
  and share K/V through L2; row blocks are issued heaviest (last) first. Rows that see no key get out = 0 and
  lse = -inf. A head dim that is not a power of two runs as two column tiles where that pads less than one
  power-of-two tile (``_split_d``: 80 = 64 + 16, Qwen2.5-VL's vision heads; 72 -> 64 + 16, SigLIP's).
- ``_kv_relevance_kernel``: grid (cdiv(max_seqlen_k, BLOCK_N), S, Hk). One program = BLOCK_N keys of one KV
  head; its K tile stays in shared memory for the whole program, and it streams the question rows of the
  group's G query heads as tiles of BLOCK_P rows of one head (head-major: a tile's q rows and lse are
  contiguous, addresses are one int64 base + fixed int32 lane offsets). Per tile it computes the transposed
  scores ``S^T = K Q^T`` [keys, rows], so the sum over rows is a row sum of the wgmma accumulator (in-thread
  adds + 2 shuffles, no shared-memory reduction), with one FMA per score: ``exp2(s * qk_scale - lse2)``. Rows
  past the end load lse = +inf (exp2 gives 0, no select); only the leading row tiles on the causal diagonal
  (rows that do not see every key < n of the block) run with the causal mask. It writes its relevance block
  once: no atomics, deterministic.

``prefill_attention_relevance`` = prefill launch, then the relevance launch reading the final lse (it needs
the full softmax normalizer of each question row, which exists only after the row's attention finished).

Tiles come through the autotune seam: ``PREFILL`` and ``RELEVANCE`` look them up (tuned tables, else
``_prefill_default`` / ``_relevance_default``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._device import sm_count_of_gpu, smem_per_block_of_gpu
from ..autotune import CPU, Tunable, gpu_name

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # for use inside kernels
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _kv_tiles(k_ptrs, v_ptrs, key_ok, d_mask, MASKED: tl.constexpr, FULL: tl.constexpr):
    """A K and a V tile: masked by key and column (MASKED), by column only, or not at all (FULL: every column of
    the tile is < D)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[:, None] & d_mask, other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_mask, other=0.0)
    elif FULL:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_mask, other=0.0)
        v = tl.load(v_ptrs, mask=d_mask, other=0.0)
    return k, v


@triton.jit
def _attn_blocks(acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, offs_m, offs_n, offs_d, offs_d2, lo,
                 hi, m, n, stride_kt, stride_vt, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi); m_i is in log2 units.

    MASKED=False: every key of every block is visible to every row (no masks but the head-dim one).
    MASKED=True: keys past n and, with CAUSAL, keys j > i + (n - m) are dropped; a row that has seen no key
    yet keeps m_i = -inf and l_i = 0.
    SPLIT (a split head dim): columns [0, BLOCK_D) are all < D and ride in (q, k, v, acc), columns
    [BLOCK_D, BLOCK_D + BLOCK_D2) in (q2, k2, v2, acc2): S = q k^T + q2 k2^T, and P V per part.
    """
    k_ptrs += tl.cast(lo, tl.int64) * stride_kt
    v_ptrs += tl.cast(lo, tl.int64) * stride_vt
    d_mask = offs_d[None, :] < D
    if SPLIT:
        k2_ptrs += tl.cast(lo, tl.int64) * stride_kt
        v2_ptrs += tl.cast(lo, tl.int64) * stride_vt
        d2_mask = offs_d2[None, :] < D
    for start_n in range(lo, hi, BLOCK_N):
        key_ok = (start_n + offs_n) < n
        k, v = _kv_tiles(k_ptrs, v_ptrs, key_ok, d_mask, MASKED, BLOCK_D == D or SPLIT)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if SPLIT:
            k2, v2 = _kv_tiles(k2_ptrs, v2_ptrs, key_ok, d2_mask, MASKED, BLOCK_D + BLOCK_D2 == D)
            if IEEE:
                qk = tl.dot(q2, tl.trans(k2), qk, input_precision="ieee")
            else:
                qk = tl.dot(q2, tl.trans(k2), qk)
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= (offs_m + (n - m))[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        if SPLIT:
            if IEEE:
                acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision="ieee")
            else:
                acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None])
            k2_ptrs += BLOCK_N * stride_kt
            v2_ptrs += BLOCK_N * stride_vt
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, acc2, l_i, m_i


@triton.jit
def _prefill_fwd_kernel(Q, K, V, Out, Lse, cu_q, cu_k,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_ot, stride_oh, stride_lh, stride_cq, stride_ck, qk_scale, num_m_blocks,
                        HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """out[i, h] = softmax_j(scale q_i.k_j) v_j and lse[h, i] (natural log) for BLOCK_M rows of head h (the head
    dim as one BLOCK_D tile, or with SPLIT as BLOCK_D + BLOCK_D2 columns: ``_split_d``)."""
    pid_sh = tl.program_id(0)
    seg = pid_sh // HQ
    h = pid_sh % HQ
    g = h // G
    start_m = (num_m_blocks - 1 - tl.program_id(1)) * BLOCK_M  # heaviest row block first
    qa = tl.load(cu_q + seg * stride_cq)
    m = tl.load(cu_q + (seg + 1) * stride_cq) - qa
    if start_m >= m:
        return
    ka = tl.load(cu_k + seg * stride_ck)
    n = tl.load(cu_k + (seg + 1) * stride_ck) - ka

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < m
    d_mask = offs_d[None, :] < D
    q_ptrs = Q + (qa + offs_m).to(tl.int64)[:, None] * stride_qt + h.to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask, other=0.0)
    k_ptrs = (K + ka.to(tl.int64) * stride_kt + g.to(tl.int64) * stride_kh
              + offs_n[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (V + ka.to(tl.int64) * stride_vt + g.to(tl.int64) * stride_vh
              + offs_n[:, None] * stride_vt + offs_d[None, :])
    if SPLIT:  # the head dim's last BLOCK_D2 columns
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_mask = offs_d2[None, :] < D
        q2 = tl.load(Q + (qa + offs_m).to(tl.int64)[:, None] * stride_qt + h.to(tl.int64) * stride_qh
                     + offs_d2[None, :], mask=row_ok[:, None] & d2_mask, other=0.0)
        k2_ptrs = (K + ka.to(tl.int64) * stride_kt + g.to(tl.int64) * stride_kh
                   + offs_n[:, None] * stride_kt + offs_d2[None, :])
        v2_ptrs = (V + ka.to(tl.int64) * stride_vt + g.to(tl.int64) * stride_vh
                   + offs_n[:, None] * stride_vt + offs_d2[None, :])
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    else:  # stand-ins that nothing reads
        offs_d2, q2, k2_ptrs, v2_ptrs, acc2 = offs_d, q, k_ptrs, v_ptrs, q

    if CAUSAL:
        # The tile's first row sees j <= start_m + n - m: blocks ending there are seen by every row.
        full_hi = tl.minimum(tl.maximum(start_m + n - m + 1, 0) // BLOCK_N, n // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + n - m, 0), n)
    else:
        full_hi = (n // BLOCK_N) * BLOCK_N
        hi = n

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, acc2, l_i, m_i = _attn_blocks(acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, offs_m, offs_n,
                                       offs_d, offs_d2, 0, full_hi, m, n, stride_kt, stride_vt, qk_scale, D, BLOCK_D,
                                       BLOCK_D2, SPLIT, BLOCK_N, False, CAUSAL, IEEE)
    acc, acc2, l_i, m_i = _attn_blocks(acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, offs_m, offs_n,
                                       offs_d, offs_d2, full_hi, hi, m, n, stride_kt, stride_vt, qk_scale, D, BLOCK_D,
                                       BLOCK_D2, SPLIT, BLOCK_N, True, CAUSAL, IEEE)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    o_ptrs = Out + (qa + offs_m).to(tl.int64)[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask)
    if SPLIT:
        o2_ptrs = Out + (qa + offs_m).to(tl.int64)[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d2[None, :]
        tl.store(o2_ptrs, (acc2 / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & d2_mask)
    tl.store(Lse + h.to(tl.int64) * stride_lh + qa + offs_m, lse, mask=row_ok)


@triton.jit
def _relevance_tiles(acc, k, Q, Lse, row0, g, offs_n, offs_p, offs_d, rows, n_tiles, rb_lo, n_rb, causal_shift,
                     stride_qt, stride_qh, stride_lh, qk_scale,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                     MASKED: tl.constexpr, IEEE: tl.constexpr):
    """acc[j] += sum_i exp2(qk_scale k_j.q_i - log2e lse_i) over n_tiles tiles of BLOCK_P question rows.

    Tiles walk row blocks rb_lo .. rb_lo + n_rb - 1 of query head g*G, then the same blocks of head g*G + 1, ...
    (rows relative to ``row0``, the segment-absolute index of the program's first question row). Rows at or past
    ``rows`` load lse = +inf and add exp2(-inf) = 0 with no select. MASKED=True drops keys
    j > row + causal_shift (the causal diagonal); MASKED=False assumes every row sees every stored key of the
    block (keys past n are computed, never written).
    """
    q_lane = offs_p[:, None] * stride_qt + offs_d[None, :]  # in-tile offsets (< BLOCK_P * stride_qt), int64 bases
    hh = 0
    rb = rb_lo
    for _ in range(0, n_tiles):
        r = rb * BLOCK_P
        head = (g * G + hh).to(tl.int64)
        row_ok = offs_p < rows - r
        if D == BLOCK_D:
            q_mask = row_ok[:, None]
        else:
            q_mask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + (row0 + r).to(tl.int64) * stride_qt + head * stride_qh + q_lane, mask=q_mask, other=0.0)
        lse2 = tl.load(Lse + head * stride_lh + row0 + r + offs_p, mask=row_ok, other=float("inf")) * _LOG2E
        if IEEE:
            s = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            s = tl.dot(k, tl.trans(q))  # S^T [keys, rows]: the sum over rows stays in-thread (+ 2 shuffles)
        p = tl.math.exp2(s * qk_scale - lse2[None, :])
        if MASKED:
            p = tl.where(offs_n[:, None] <= (r + offs_p + causal_shift)[None, :], p, 0.0)
        acc += tl.sum(p, 1)
        rb += 1
        wrap = rb == rb_lo + n_rb
        rb = tl.where(wrap, rb_lo, rb)
        hh = tl.where(wrap, hh + 1, hh)
    return acc


@triton.jit
def _kv_relevance_kernel(Q, K, Lse, Rel, cu_q, cu_k, rel_rows,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_rg, stride_rs, stride_rc,
                         stride_cq, stride_ck, qk_scale,
                         G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """relevance[g, j] = sum_{h // G == g} sum_{i in [r0, r1)} exp2(qk_scale q_i.k_j - log2e lse[h, i]),
    visible keys only, for BLOCK_N keys j of KV head g in one segment."""
    start_n = tl.program_id(0) * BLOCK_N
    seg = tl.program_id(1)
    g = tl.program_id(2)
    ka = tl.load(cu_k + seg * stride_ck)
    n = tl.load(cu_k + (seg + 1) * stride_ck) - ka
    if start_n >= n:
        return
    qa = tl.load(cu_q + seg * stride_cq)
    m = tl.load(cu_q + (seg + 1) * stride_cq) - qa
    r0 = tl.load(rel_rows + seg * stride_rs)
    r1 = tl.load(rel_rows + seg * stride_rs + stride_rc)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < n
    k = tl.load(K + (ka + offs_n).to(tl.int64)[:, None] * stride_kt + g.to(tl.int64) * stride_kh + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    if CAUSAL:
        row_lo = tl.maximum(r0, start_n - (n - m))  # rows before it see none of these keys
        # Rows from row_full on see every stored key of the block (keys < n): their tiles need no mask.
        row_full = tl.minimum(tl.maximum(row_lo, tl.minimum(start_n + BLOCK_N, n) - 1 - (n - m)), r1)
        n_masked = tl.cdiv(tl.maximum(row_full - row_lo, 0), BLOCK_P)  # leading row blocks of every head
    else:
        row_lo = r0
        n_masked = 0
    rows = r1 - row_lo
    n_rb = tl.cdiv(tl.maximum(rows, 0), BLOCK_P)  # row blocks per query head
    if CAUSAL:
        acc = _relevance_tiles(acc, k, Q, Lse, qa + row_lo, g, offs_n, offs_p, offs_d, rows, G * n_masked, 0,
                               n_masked, row_lo + n - m, stride_qt, stride_qh, stride_lh, qk_scale,
                               G, D, BLOCK_D, BLOCK_P, True, IEEE)
    acc = _relevance_tiles(acc, k, Q, Lse, qa + row_lo, g, offs_n, offs_p, offs_d, rows, G * (n_rb - n_masked),
                           n_masked, n_rb - n_masked, 0, stride_qt, stride_qh, stride_lh, qk_scale,
                           G, D, BLOCK_D, BLOCK_P, False, IEEE)
    tl.store(Rel + g.to(tl.int64) * stride_rg + ka + offs_n, acc, mask=key_ok)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _split_d(d: int) -> tuple:
    """``(BLOCK_D, BLOCK_D2)`` of ``_prefill_fwd_kernel``: the head dim as its largest power of two and a tail of
    ``max(16, next_pow2(rest))`` columns where that pads less than one power-of-two tile (80 = 64 + 16, 72 -> 64 + 16,
    96 = 64 + 32, 160 = 128 + 32: every MMA's k and n are multiples of 16), else ``(_block_d(d), 0)``. Padding a head
    dim of 80 to 128 spends 37.5 % of each QK^T and PV MMA on zeros; split, 0 % (72: 10 %)."""
    full = _block_d(d)
    head = full // 2
    tail = max(16, triton.next_power_of_2(max(d - head, 1)))
    if d <= head or head < 16 or head + tail >= full:
        return full, 0
    return head, tail


class AttentionKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    G: int
    Hk: int
    causal: bool
    S: int  # segments
    m: int  # max_seqlen_q (kv_relevance: the question rows)
    n: int  # max_seqlen_k


def _key(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal) -> tuple:
    _, Hq, D = q.shape
    Hk = k.shape[1]
    return (gpu_name(q.device), q.dtype, D, Hq // max(Hk, 1), Hk, bool(causal),
            cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k)


def _prefill_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, out, lse):
    return _key(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal)


def _relevance_key(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, rel_rows,
                   relevance):
    return _key(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal)


def _prefill_default(key: AttentionKey) -> dict:
    """Tiles for ``_prefill_fwd_kernel``.

    H100 sweep (bench/figure3_relevance.py --tune, bf16 D 128, 16k causal): 128 x 64 tiles, 8 warps,
    3 stages reach ~500 TFLOP/s; 2 stages lose 25-35 %, 4 warps at 128 x 64 spill (~100 TFLOP/s). H200 tuner, D 80
    split 64 + 16 (Qwen2.5-VL's vision heads, 7 shapes): 4 warps won at every shape (1.14-1.28x over 8 warps), and
    64-row tiles where segments hold <= 64 query rows (windows: 1.87-1.99x over 128-row tiles, half of them
    padding); both now the rule for kernels at most 80 columns wide (64-row tiles at D <= 64 by the same count).
    64-row tiles also where 128-row ones would leave SMs without a program (H200, D 64: 128 programs of 128 rows
    took 1.44x as long as 256 of 64; D 80, 256 programs of 128 rows: 1.20x faster than 512 of 64).
    """
    if key.gpu == CPU:  # interpreter: small tiles so tiny test shapes still cross block edges
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    bd = sum(_split_d(key.D))  # columns the kernel's tiles hold
    if key.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if bd <= 80:
        tall = key.m > 64 and triton.cdiv(key.m, 128) * key.S * key.G * key.Hk >= _sms(key)  # programs
        return dict(BLOCK_M=128 if tall else 64, BLOCK_N=64, num_warps=4, num_stages=3)
    if bd <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def _relevance_default(key: AttentionKey) -> dict:
    """Tiles for ``_kv_relevance_kernel``: BLOCK_N keys x BLOCK_P question rows of one head.

    ``key.m`` bounds the rel rows of a segment (max_seqlen_q; the whole segment in the fused op). H100 sweep
    (bench/figure3_relevance.py --tune relevance, bf16, D 128, 64-512 rows x 8k-32k keys):
    - G >= 4 (Qwen2 28/4): 64 keys x 128 rows (m64n128 wgmma: compute-bound rather than bound by the shared
      memory that feeds both operands) is best from 256 rows up (-5..-8 % vs 128 x 64); with <= 64 rows a
      128-row tile would be half empty, so 128 keys x 64 rows.
    - G < 4 (Llama-2 32/32, few row tiles per program): 128 keys x 64 rows, 2 stages, registers capped at 168
      so 3 CTAs fit per SM (64 KB shared memory each): best at every shape (-5..-12 %).
    H200 trials (bench.autotune): the G < 4 tiles also win at G >= 4, D 128, from 4 programs of 128 keys per SM
    (1.01-1.23x; with fewer, at 4k keys and 512 rows, they lose up to 1.9x), and in the fused op, whose ``m`` is the
    segment while it sums only the question rows (bench.relevance_fused_rows, 64 of 16k: 1.6-1.9x over 64 keys x
    128 rows, half of each row tile empty); <= 64 rows: 8 warps, 3 stages at D 128 (1.05-1.10x),
    64 keys x 64 rows at D 64 (1.12x), x 32 rows, 4 stages, for <= 32 rows (1.39x); D 256: 256 x 64 tiles, 8 warps,
    3 stages where shared memory holds them (224 KB) and their last wave keeps the SMs about as full as 128 x 64
    tiles would (1.10-1.14x over those; 1.83x slower with 64 programs on 132 SMs), else 128 x 64 (160 KB; 1.05-1.16x
    over 64 x 64).
    """
    if key.gpu == CPU:  # interpreter: small tiles so tiny test shapes still cross block edges
        return dict(BLOCK_N=16, BLOCK_P=16, num_warps=4, num_stages=1)
    small = dict(BLOCK_N=64, BLOCK_P=64, num_warps=4, num_stages=2)
    if key.dtype == torch.float32:
        return small
    capped = dict(BLOCK_N=128, BLOCK_P=64, num_warps=4, num_stages=2, maxnreg=168)
    bd = _block_d(key.D)
    if bd > 128:  # one CTA per SM: the grid's last wave decides how full the GPU runs
        smem = smem_per_block_of_gpu(key.gpu)
        wide = {bn: dict(BLOCK_N=bn, BLOCK_P=64, num_warps=8, num_stages=3) for bn in (256, 128)}
        fits = {bn: smem is None or _relevance_resources(key, cfg)[0] <= smem for bn, cfg in wide.items()}
        fill = {bn: _wave_fill(triton.cdiv(key.n, bn) * key.S * key.Hk, key) for bn in wide}
        if fits[256] and fill[256] >= 0.9 * fill[128]:
            return wide[256]
        return wide[128] if fits[128] else small
    if key.G < 4:
        return capped
    if key.m <= 64:
        if bd <= 64:
            return dict(BLOCK_N=64, BLOCK_P=32, num_warps=4, num_stages=4) if key.m <= 32 else \
                dict(BLOCK_N=64, BLOCK_P=64, num_warps=4, num_stages=3)
        return dict(BLOCK_N=128, BLOCK_P=64, num_warps=8, num_stages=3)
    if bd > 64 and (key.m > 1024 or triton.cdiv(key.n, 128) * key.S * key.Hk >= 4 * _sms(key)):
        return capped  # m > 1024: the fused op's whole segment, of which only a few question rows are summed
    return dict(BLOCK_N=64, BLOCK_P=128, num_warps=4, num_stages=3)


def _sms(key: AttentionKey) -> int:
    """SMs of the key's GPU (132, an H100's or H200's, for a name no device here has)."""
    return sm_count_of_gpu(key.gpu) or 132


def _wave_fill(programs: int, key: AttentionKey) -> float:
    """The share of the SMs' program slots a grid of ``programs`` keeps busy at one program per SM (1: every wave
    full)."""
    sms = _sms(key)
    return programs / (triton.cdiv(programs, sms) * sms)


def _prefill_space(key: AttentionKey) -> list:
    """The prefill tiles of ``python -m bench.figure3_relevance --tune prefill`` (BLOCK_M, BLOCK_N, warps,
    stages)."""
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
            ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3),
             (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4))]


def _relevance_space(key: AttentionKey) -> list:
    """The relevance tiles of ``python -m bench.figure3_relevance --tune relevance`` (+ ``maxnreg`` 168: 3 CTAs
    per SM at 64 KB of shared memory)."""
    return [dict(BLOCK_N=n, BLOCK_P=p, num_warps=w, num_stages=s) for n, p, w, s in
            ((128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 4), (128, 64, 8, 3), (128, 32, 4, 3), (128, 32, 4, 4),
             (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3))] + [
        dict(BLOCK_N=128, BLOCK_P=64, num_warps=4, num_stages=2, maxnreg=168)]


def _prefill_resources(key: AttentionKey, cfg: dict):
    """Shared memory: the q tile + a K and a V tile per stage. Registers: the fp32 accumulator and score tile,
    and the q tile, over the threads, + 32 (128 x 64 tiles at 4 warps come out above 255: they spill)."""
    bd, elem, bm, bn = sum(_split_d(key.D)), key.dtype.itemsize, cfg["BLOCK_M"], cfg["BLOCK_N"]
    smem = (bm + cfg["num_stages"] * 2 * bn) * bd * elem
    words = bm * bd + bm * bn + bm * bd * elem // 4
    return smem, 32 + words // (32 * cfg["num_warps"])


def _relevance_resources(key: AttentionKey, cfg: dict):
    """Shared memory: the K tile + a q tile per stage. Registers: the fp32 score tile and the K tile over the
    threads, + 32, or ``maxnreg`` when it caps them."""
    bd, elem, bn, bp = _block_d(key.D), key.dtype.itemsize, cfg["BLOCK_N"], cfg["BLOCK_P"]
    smem = (bn + cfg["num_stages"] * bp) * bd * elem
    regs = 32 + (bn * bp + bn * bd * elem // 4) // (32 * cfg["num_warps"])
    return smem, min(regs, cfg.get("maxnreg", regs))


def _launch_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, out, lse, cfg):
    Tq, Hq, D = q.shape
    Hk = k.shape[1]
    S = cu_seqlens_q.shape[0] - 1
    cfg = dict(cfg)
    block_m = cfg.pop("BLOCK_M")
    num_m_blocks = triton.cdiv(max_seqlen_q, block_m)
    if S == 0 or num_m_blocks == 0 or Hq == 0:
        return
    grid = (S * Hq, num_m_blocks)
    block_d, block_d2 = _split_d(D)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), cu_seqlens_q.stride(0), cu_seqlens_k.stride(0),
        scale * LOG2E, num_m_blocks,
        HQ=Hq, G=Hq // Hk, D=D, BLOCK_D=block_d, BLOCK_D2=block_d2, SPLIT=block_d2 > 0, BLOCK_M=block_m,
        CAUSAL=bool(causal), IEEE=q.dtype == torch.float32, **cfg)


def _launch_relevance(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, rel_rows,
                      relevance, cfg):
    Hq, D = q.shape[1], q.shape[2]
    Hk = k.shape[1]
    S = cu_seqlens_k.shape[0] - 1
    cfg = dict(cfg)
    block_n = cfg.pop("BLOCK_N")
    grid = (triton.cdiv(max_seqlen_k, block_n), S, Hk)
    if 0 in grid:
        return
    _kv_relevance_kernel[grid](
        q, k, lse, relevance, cu_seqlens_q, cu_seqlens_k, rel_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), relevance.stride(0),
        rel_rows.stride(0), rel_rows.stride(1), cu_seqlens_q.stride(0), cu_seqlens_k.stride(0), scale * LOG2E,
        G=Hq // Hk, D=D, BLOCK_D=_block_d(D), BLOCK_N=block_n, CAUSAL=bool(causal),
        IEEE=q.dtype == torch.float32, **cfg)


_BUCKETS = ("Hk", "S", "m", "n")
PREFILL = Tunable("prefill_attention", "triton", key=_prefill_key, key_type=AttentionKey, space=_prefill_space,
                  default=_prefill_default, launch=_launch_prefill, warmup=Tunable.triton_warmup(_launch_prefill),
                  resources=_prefill_resources, buckets=_BUCKETS)
RELEVANCE = Tunable("kv_relevance", "triton", key=_relevance_key, key_type=AttentionKey, space=_relevance_space,
                    default=_relevance_default, launch=_launch_relevance,
                    warmup=Tunable.triton_warmup(_launch_relevance), resources=_relevance_resources,
                    buckets=_BUCKETS)


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      causal: bool, out, lse) -> None:
    """``torch.ops.sparsevila.prefill_attention``: writes out [Tq, Hq, D] (q's dtype) and lse [Hq, Tq] fp32."""
    PREFILL(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, out, lse)


def kv_relevance(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                 causal: bool, rel_rows, relevance) -> None:
    """``torch.ops.sparsevila.kv_relevance``: writes relevance [Hk, Tk] fp32 from q, k and the rows' lse."""
    RELEVANCE(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, rel_rows, relevance)


def prefill_attention_relevance(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                                scale: float, causal: bool, rel_rows, out, lse, relevance) -> None:
    """``torch.ops.sparsevila.prefill_attention_relevance``: the prefill, then ``kv_relevance`` on its lse."""
    prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, out, lse)
    kv_relevance(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, rel_rows,
                 relevance)
