"""Triton kernels for Op 4: split-KV decode attention, in-place append, and gather-in-kernel sparse decode.

decode_attention (flash-decoding): grid (num_splits, B, Hk). Program (s, b, g) loads the G query heads of KV
head g as one [BLOCK_G >= 16, D] tile and streams its slice of the row's keys once, so each KV head is read
once for its whole query group. Row b's length n_b lives on the device: the slice is
``chunk_b = ceil(n_b / num_splits)`` rounded up to BLOCK_N, split s covers ``[s chunk_b, (s+1) chunk_b) ∩ [0, n_b)``
and programs past n_b exit at once (the grid is static, sized from the capacity). Online softmax in the log2
domain (``qk_scale = scale * log2(e)``), fp32 statistics. Each split writes (o_s / l_s, m_s + log2 l_s) to fp32
scratch; the combine kernel merges the used splits:

    lse = log2 sum_s 2^{lse_s},  out = sum_s 2^{lse_s - lse} o_s         (lse returned as ln: * ln 2)

With one split the split kernel writes out/lse directly (no combine launch). n_b == 0 gives out 0, lse -inf.
No host syncs; the scratch is allocated per call, so the launch is CUDA-graph capturable.

sparse_decode_attention is the same kernel with GATHER: key j of row (b, g) is cache position
``indices[b, g, j]`` for ``j < n_valid[b]``.

append_kv: one program per b writes all heads of the new token at slot lengths[b], then bumps lengths[b].
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, idx_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr, qk_scale,
                         q_sb, q_sh, k_sb, k_sg, k_sn, v_sb, v_sg, v_sn, i_sb, i_sg, o_sb, o_sh, l_sb, l_sh,
                         G, HQ, D,
                         NUM_SPLITS: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    n = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    rows = tl.arange(0, BLOCK_G)
    heads = g * G + rows
    mg = rows < G
    d = tl.arange(0, BLOCK_D)
    md = d < D
    if lo >= n:
        if NUM_SPLITS == 1:  # n == 0: empty softmax
            tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mg[:, None] & md[None, :])
            tl.store(lse_ptr + b.to(tl.int64) * l_sb + heads * l_sh, tl.full([BLOCK_G], float("-inf"), tl.float32),
                     mask=mg)
        return
    hi = tl.minimum(lo + chunk, n)

    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=mg[:, None] & md[None, :], other=0.0)
    k_row = k_ptr + b.to(tl.int64) * k_sb + g.to(tl.int64) * k_sg
    v_row = v_ptr + b.to(tl.int64) * v_sb + g.to(tl.int64) * v_sg
    i_row = idx_ptr + b.to(tl.int64) * i_sb + g.to(tl.int64) * i_sg

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        mj = j < hi
        if GATHER:
            pos = tl.load(i_row + j, mask=mj, other=0).to(tl.int64)
        else:
            pos = j.to(tl.int64)
        m2 = mj[:, None] & md[None, :]
        kt = tl.load(k_row + pos[:, None] * k_sn + d[None, :], mask=m2, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(mj[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds >= 1 valid key
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_row + pos[:, None] * v_sn + d[None, :], mask=m2, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    o = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mg[:, None] & md[None, :])
        tl.store(lse_ptr + b.to(tl.int64) * l_sb + heads * l_sh, lse2 * 0.6931471805599453, mask=mg)
    else:
        # scratch: po [B, Hq, NUM_SPLITS, D], pl [B, Hq, NUM_SPLITS], contiguous
        bh = b.to(tl.int64) * HQ + heads
        tl.store(po_ptr + (bh[:, None] * NUM_SPLITS + split) * D + d[None, :], o, mask=mg[:, None] & md[None, :])
        tl.store(pl_ptr + bh * NUM_SPLITS + split, lse2, mask=mg)


@triton.jit
def _decode_combine_kernel(len_ptr, po_ptr, pl_ptr, out_ptr, lse_ptr, o_sb, o_sh, l_sb, l_sh, HQ, D,
                           NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    used = tl.cdiv(n, tl.maximum(chunk, 1))  # splits that hold keys (0 when n == 0)
    s = tl.arange(0, BLOCK_S)
    ms = s < used
    d = tl.arange(0, BLOCK_D)
    md = d < D
    bh = b.to(tl.int64) * HQ + h
    pl = tl.load(pl_ptr + bh * NUM_SPLITS + s, mask=ms, other=float("-inf"))
    m = tl.max(pl, 0)
    m_safe = tl.where(used > 0, m, 0.0)
    w = tl.math.exp2(pl - m_safe)
    denom = tl.sum(w, 0)
    po = tl.load(po_ptr + (bh * NUM_SPLITS + s[:, None]) * D + d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
    o = tl.sum(w[:, None] * po, 0) / tl.maximum(denom, 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * o_sb + h * o_sh + d, o.to(out_ptr.dtype.element_ty), mask=md)
    lse = tl.where(used > 0, (m_safe + tl.math.log2(tl.maximum(denom, 1e-30))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b.to(tl.int64) * l_sb + h * l_sh, lse)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton interpreter: a few splits, so the combine path is exercised
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _decode_config(B: int, hk: int, G: int, cap: int, D: int, elem: int, sms: int) -> dict:
    """Split-KV heuristic: ~2 programs per SM, each slice >= 4 tiles of BLOCK_N keys (so the per-split
    overhead of loading q and writing partials stays small), at most 64 splits (combine tile)."""
    block_d = max(16, triton.next_power_of_2(D))
    block_n = max(16, min(128, 16384 // (block_d * elem)))  # ~16 KB K tile + 16 KB V tile in flight
    max_splits = max(1, min(64, triton.cdiv(cap, 4 * block_n)))
    splits = max(1, min(max_splits, triton.cdiv(2 * sms, B * hk)))
    return {"NUM_SPLITS": splits, "BLOCK_G": max(16, triton.next_power_of_2(G)), "BLOCK_N": block_n,
            "BLOCK_D": block_d, "num_warps": 4, "num_stages": 3 if elem < 4 else 2}


def _launch_decode(q, k, v, lengths, indices, scale, out, lse, num_splits=None) -> None:
    """Split kernel (+ combine when num_splits > 1); ``indices`` not None selects the gather variant."""
    B, HQ, D = q.shape
    HK, cap = k.shape[1], k.shape[2]
    if B == 0 or HQ == 0:
        return
    G = HQ // HK
    cfg = _decode_config(B, HK, G, cap, D, q.element_size(), _num_sms(q.device))
    if num_splits is not None:
        cfg["NUM_SPLITS"] = num_splits
    S = cfg["NUM_SPLITS"]
    gather = indices is not None
    if S > 1:
        po = torch.empty(B, HQ, S, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device)
    else:
        po = pl = lse  # unused
    idx = indices if gather else lengths
    _decode_split_kernel[(S, B, HK)](
        q, k, v, lengths, idx, out, lse, po, pl, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0) if gather else 0, idx.stride(1) if gather else 0,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), G, HQ, D,
        GATHER=gather, IEEE=q.dtype == torch.float32, **cfg)
    if S > 1:
        _decode_combine_kernel[(B, HQ)](
            lengths, po, pl, out, lse, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), HQ, D,
            NUM_SPLITS=S, BLOCK_N=cfg["BLOCK_N"], BLOCK_S=triton.next_power_of_2(S), BLOCK_D=cfg["BLOCK_D"],
            num_warps=4)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV decode over ``k, v [B, Hk, capacity, D]`` up to ``lengths[b]``; see module doc."""
    _launch_decode(q, k, v, lengths, None, scale, out, lse)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor,
                            n_valid: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV decode over ``k_cache[b, g, indices[b, g, :n_valid[b]]]`` (gather in the kernel)."""
    _launch_decode(q, k_cache, v_cache, n_valid, indices, scale, out, lse)


@triton.jit
def _append_kv_kernel(kn_ptr, vn_ptr, kc_ptr, vc_ptr, len_ptr,
                      kn_sb, kn_sh, vn_sb, vn_sh, kc_sb, kc_sh, kc_sn, vc_sb, vc_sh, vc_sn,
                      HK, D, CAP, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(len_ptr + b)
    ok = n < CAP  # a full cache is left as it is (the public function checks this where it can)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    for h0 in range(0, HK, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = ((h < HK)[:, None] & md[None, :]) & ok
        kt = tl.load(kn_ptr + b.to(tl.int64) * kn_sb + h[:, None] * kn_sh + d[None, :], mask=m)
        vt = tl.load(vn_ptr + b.to(tl.int64) * vn_sb + h[:, None] * vn_sh + d[None, :], mask=m)
        slot = n.to(tl.int64)
        tl.store(kc_ptr + b.to(tl.int64) * kc_sb + h[:, None].to(tl.int64) * kc_sh + slot * kc_sn + d[None, :],
                 kt, mask=m)
        tl.store(vc_ptr + b.to(tl.int64) * vc_sb + h[:, None].to(tl.int64) * vc_sh + slot * vc_sn + d[None, :],
                 vt, mask=m)
    tl.store(len_ptr + b, n + 1, mask=ok)


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """``k_cache[b, :, lengths[b]] = k_new[b]`` (same for v), then ``lengths[b] += 1``; one program per b."""
    B, HK, D = k_new.shape
    if B == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_h = max(1, min(triton.next_power_of_2(HK), 4096 // block_d))
    _append_kv_kernel[(B,)](
        k_new, v_new, k_cache, v_cache, lengths,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HK, D, k_cache.shape[2], BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
