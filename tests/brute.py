"""Float64 brute force of every op, written directly from the formulas of docs/ops.md.

Independent of ``sparsevila_ops.reference``: full score matrices are materialized per (segment, head) in
float64 and index logic is plain Python loops. Small sizes only. Every function takes CPU tensors (any
dtype, any strides) and host-side ints, and returns new float64 / int64 tensors.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

NEG_INF = float("-inf")


def _segments(cu) -> List[tuple]:
    c = [int(x) for x in cu]
    return list(zip(c[:-1], c[1:]))


def _lse(s: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(s[..., j]) in float64, -inf for an empty or fully masked row."""
    mx = s.max(dim=-1, keepdim=True).values if s.shape[-1] else torch.full((*s.shape[:-1], 1), NEG_INF,
                                                                                dtype=s.dtype)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return (safe + torch.exp(s - safe).sum(dim=-1, keepdim=True).log()).squeeze(-1)


def salience(q, k, cu_seqlens, scale: float, num_summary: int, lse: Optional[torch.Tensor] = None,
             reduce_heads: bool = True) -> torch.Tensor:
    """Op 1. For segment [a, b), rows R = [a, b) (c == 0) or [a, a + min(c, n)):
    P[h,i,j] = exp(scale q[i,h].k[j,h] - L[h,i]); out[h,j] = 1/|R| sum_{i in R} P; reduce: mean over h too."""
    T, H, _ = q.shape
    qd, kd = q.double(), k.double()
    out = torch.zeros(H, T, dtype=torch.float64)
    for a, b in _segments(cu_seqlens):
        n = b - a
        if n == 0:
            continue
        rows = n if num_summary == 0 else min(num_summary, n)
        for h in range(H):
            s = scale * (qd[a:b, h] @ kd[a:b, h].T)  # [n, n]
            L = _lse(s) if lse is None else lse[h, a:b].double()
            p = torch.exp(s - L[:, None])
            out[h, a:b] = p[:rows].sum(dim=0) / rows
    return out.mean(dim=0) if reduce_heads else out


def _visible(i: int, m: int, n: int, causal: bool) -> torch.Tensor:
    """Keys row i of a segment with m queries and n keys sees: j in [0, n), j <= i + (n - m) if causal."""
    j = torch.arange(n)
    return (j <= i + (n - m)) if causal else torch.ones(n, dtype=torch.bool)


def prefill(q, k, v, cu_q, cu_k, scale: float, causal: bool, rel_rows=None):
    """Op 2: ``(out [Tq, Hq, D], lse [Hq, Tq], relevance [Hk, Tk] or None)`` in float64."""
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    G = Hq // Hk
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.zeros(Tq, Hq, D, dtype=torch.float64)
    lse = torch.full((Hq, Tq), NEG_INF, dtype=torch.float64)
    rel = torch.zeros(Hk, Tk, dtype=torch.float64) if rel_rows is not None else None
    rr = [tuple(int(x) for x in r) for r in rel_rows] if rel_rows is not None else None
    for s_idx, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k))):
        m, n = qb - qa, kb - ka
        if m == 0:
            continue
        mask = torch.stack([_visible(i, m, n, causal) for i in range(m)]) if n else torch.zeros(m, 0, dtype=bool)
        for h in range(Hq):
            g = h // G
            s = scale * (qd[qa:qb, h] @ kd[ka:kb, g].T)  # [m, n]
            s = s.masked_fill(~mask, NEG_INF)
            L = _lse(s)
            p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(L), L, 0.0)[:, None]), 0.0)
            out[qa:qb, h] = p @ vd[ka:kb, g]
            lse[h, qa:qb] = L
            if rel is not None:
                r0, r1 = rr[s_idx]
                rel[g, ka:kb] += p[r0:r1].sum(dim=0)
    return out, lse, rel


def kv_relevance(q, k, lse, cu_q, cu_k, scale: float, causal: bool, rel_rows) -> torch.Tensor:
    """Op 2 standalone: relevance[g, j] = sum_{h//G == g} sum_{i in [r0, r1)} exp(scale q_i.k_j - lse[h, i])
    over visible keys, float64 [Hk, Tk]."""
    Tq, Hq, _ = q.shape
    Tk, Hk, _ = k.shape
    G = Hq // Hk
    qd, kd = q.double(), k.double()
    rel = torch.zeros(Hk, Tk, dtype=torch.float64)
    for ((qa, qb), (ka, kb)), (r0, r1) in zip(zip(_segments(cu_q), _segments(cu_k)), rel_rows.tolist()):
        m, n = qb - qa, kb - ka
        for i in range(r0, r1):
            vis = _visible(i, m, n, causal)
            for h in range(Hq):
                s = scale * (kd[ka:kb, h // G] @ qd[qa + i, h])
                rel[h // G, ka:kb] += torch.where(vis, torch.exp(s - float(lse[h, qa + i])), 0.0)
    return rel


def topk_positions(scores_row: Sequence[float], vs: int, ve: int, keep: int) -> List[int]:
    """The min(keep, ve - vs) highest scores in [vs, ve), ties to the lower position, sorted by position."""
    span = sorted(range(vs, ve), key=lambda j: (-float(scores_row[j]), j))
    return sorted(span[:min(keep, ve - vs)])


def select(scores: torch.Tensor, vis_start: Sequence[int], vis_end: Sequence[int], keep: int) -> torch.Tensor:
    """Op 3 selection: int64 ``[..., B, Hk, keep]`` (tail -1) for scores ``[..., B, Hk, T]``."""
    flat = scores.reshape(-1, *scores.shape[-3:])
    out = torch.full((*flat.shape[:-1], keep), -1, dtype=torch.int64)
    for l in range(flat.shape[0]):
        for b in range(flat.shape[1]):
            for g in range(flat.shape[2]):
                pos = topk_positions(flat[l, b, g].tolist(), vis_start[b], vis_end[b], keep)
                out[l, b, g, :len(pos)] = torch.tensor(pos, dtype=torch.int64)
    return out.reshape(*scores.shape[:-1], keep)


def packed_positions(selected: Sequence[int], vs: int, ve: int, t_b: int) -> List[int]:
    """Cache positions of one packed row: [0, vs), the selected positions (-1 dropped), [ve, t_b)."""
    return list(range(vs)) + [int(j) for j in selected if j >= 0] + list(range(ve, t_b))


def pack(caches: Sequence[torch.Tensor], indices: torch.Tensor, vis_start, vis_end, seq_lens):
    """Op 3 packing: per layer a dict ``(b, g) -> gathered rows [len_b, D]`` (float64), and the lengths."""
    L = len(caches)
    B, Hk = caches[0].shape[:2]
    lengths = [len(packed_positions(indices[0, b, 0].tolist(), vis_start[b], vis_end[b], seq_lens[b]))
               for b in range(B)]
    rows = []
    for l in range(L):
        per = {}
        for b in range(B):
            for g in range(Hk):
                pos = packed_positions(indices[l, b, g].tolist(), vis_start[b], vis_end[b], seq_lens[b])
                per[b, g] = caches[l][b, g].double()[pos]
        rows.append(per)
    return rows, lengths


def attend(q_row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Softmax attention of one query ``[D]`` over ``keys, values [n, D]``: (out [D], lse) in float64;
    n == 0 gives (0, -inf)."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64), NEG_INF
    s = scale * (keys.double() @ q_row.double())
    L = float(_lse(s))
    return torch.exp(s - L) @ values.double(), L


def decode(q, k, v, lengths: Sequence[int], scale: float):
    """Op 4: out[b, h] = attention of q[b, h] over k/v[b, h // G, :len_b]; float64 (out [B, Hq, D], lse [B, Hq])."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for h in range(Hq):
            out[b, h], lse[b, h] = attend(q[b, h], k[b, h // G, :n], v[b, h // G, :n], scale)
    return out, lse


def sparse_decode(q, k_cache, v_cache, indices, n_valid: Sequence[int], scale: float):
    """Op 4 gather form: attention over k/v_cache[b, g, indices[b, g, :n_valid_b]], float64."""
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            pos = [int(j) for j in indices[b, h // G, :int(n_valid[b])]]
            out[b, h], lse[b, h] = attend(q[b, h], k_cache[b, h // G][pos], v_cache[b, h // G][pos], scale)
    return out, lse


def prune(salience: Sequence[float], seg_lens: Sequence[int], keep_ratio: float, group: int) -> List[int]:
    """Pre-LLM pruning: per segment, mean-pool groups of ``group`` tokens, keep max(1, round(ratio * n))
    groups by the top-k tie rule; ascending indices into the merged sequence."""
    vals = [float(x) for x in salience]
    pooled = [math.fsum(vals[i:i + group]) / group for i in range(0, len(vals), group)]
    kept, start = [], 0
    for n in (n // group for n in seg_lens):
        if n:
            kept += topk_positions(pooled, start, start + n, max(1, round(keep_ratio * n)))
        start += n
    return kept
