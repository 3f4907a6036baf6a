"""Torch references for every op: the CPU backend and the oracle that tests and benchmarks import.

Plain torch on any device, fp32 logits/softmax/reductions, chunked over query rows so extra memory is
O(chunk x N), never N x N. Signatures equal the ops' (out-variants: results are written into the given
tensors). These read index tensors on the host (``.tolist()``): they are references, not fast paths.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Upper bound on the elements of one fp32 logits chunk [H, rows, n] (64 Mi floats = 256 MB).
_CHUNK_ELEMS = 1 << 26


def _row_chunk(heads: int, n: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, heads * n))


def _segments(cu: torch.Tensor):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def visual_salience(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                    num_summary: int, lse: Optional[torch.Tensor], deterministic: bool,
                    out: torch.Tensor) -> None:
    """Mean attention each key receives inside its segment (docs/ops.md, visual_salience).

    For segment [a, b), rows R = [a, b) (num_summary == 0) or [a, a + min(c, n)):
    ``out[h, j] = 1/|R| sum_{i in R} softmax_j(scale * q_i . k_j)``; ``out`` of shape [T] also averages heads.
    Deterministic by construction (``deterministic`` only matters to the kernels).
    """
    del max_seqlen, deterministic
    H = q.shape[1]
    acc = torch.zeros(H, q.shape[0], dtype=torch.float32, device=q.device)
    for a, b in _segments(cu_seqlens):
        n = b - a
        if n == 0:
            continue
        r_end = a + (n if num_summary == 0 else min(num_summary, n))
        kt = k[a:b].float().permute(1, 2, 0)  # [H, D, n]
        step = _row_chunk(H, n)
        for r0 in range(a, r_end, step):
            r1 = min(r_end, r0 + step)
            s = torch.matmul(q[r0:r1].float().transpose(0, 1), kt) * scale  # [H, r, n]
            L = lse[:, r0:r1].unsqueeze(-1) if lse is not None else torch.logsumexp(s, dim=-1, keepdim=True)
            acc[:, a:b] += torch.exp(s - L).sum(dim=1)
        acc[:, a:b] /= (r_end - a)
    if out.dim() == 1:
        out.copy_(acc.sum(0) / H)
    else:
        out.copy_(acc)


def _attend_chunk(q_rows, k_seg, G, scale, causal, i0, m, n, lse_rows=None):
    """Probabilities [Hk, G, r, n] (fp32) and log-sum-exp [Hk, G, r] for query rows i0.. of a segment.

    Row i sees key j iff not causal or j <= i + (n - m). Rows that see nothing get P = 0, L = -inf.
    With ``lse_rows`` [Hq, r] given, P = exp(s - lse) instead of the row's own softmax.
    """
    r = q_rows.shape[0]
    Hk = k_seg.shape[1]
    qf = q_rows.float().reshape(r, Hk, G, -1).permute(1, 2, 0, 3)  # [Hk, G, r, D]
    kf = k_seg.float().permute(1, 2, 0).unsqueeze(1)  # [Hk, 1, D, n]
    s = torch.matmul(qf, kf) * scale  # [Hk, G, r, n]
    if causal:
        i = torch.arange(i0, i0 + r, device=s.device).view(r, 1)
        j = torch.arange(n, device=s.device).view(1, n)
        s = s.masked_fill(j > i + (n - m), float("-inf"))
    if lse_rows is None:
        L = torch.logsumexp(s, dim=-1, keepdim=True)
    else:
        L = lse_rows.reshape(Hk, G, r, 1)
    p = torch.exp(s - L)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key: -inf - -inf
    return p, L.squeeze(-1)


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      causal: bool, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Varlen GQA attention forward (docs/ops.md, prefill_attention) without relevance."""
    _prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, None, out, lse, None)


def prefill_attention_relevance(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                                scale: float, causal: bool, rel_rows: torch.Tensor, out: torch.Tensor,
                                lse: torch.Tensor, relevance: torch.Tensor) -> None:
    """Varlen GQA attention forward plus ``relevance[g, j] = sum_{h in group g} sum_{i in rel_rows} P[h, i, j]``."""
    _prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, rel_rows, out, lse, relevance)


def _prefill(q, k, v, cu_q, cu_k, scale, causal, rel_rows, out, lse, relevance):
    Hq, Hk = q.shape[1], k.shape[1]
    G = Hq // Hk
    rr = rel_rows.tolist() if rel_rows is not None else None
    if relevance is not None:
        relevance.zero_()
    for s_idx, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k))):
        m, n = qb - qa, kb - ka
        if m == 0:
            continue
        step = _row_chunk(Hq, max(n, 1))
        for i0 in range(0, m, step):
            i1 = min(m, i0 + step)
            p, L = _attend_chunk(q[qa + i0:qa + i1], k[ka:kb], G, scale, causal, i0, m, n)
            o = torch.matmul(p, v[ka:kb].float().transpose(0, 1).unsqueeze(1))  # [Hk, G, r, D]
            out[qa + i0:qa + i1] = o.reshape(Hq, i1 - i0, -1).transpose(0, 1).to(out.dtype)
            lse[:, qa + i0:qa + i1] = L.reshape(Hq, i1 - i0)
            if rr is not None:
                r0, r1 = max(rr[s_idx][0], i0), min(rr[s_idx][1], i1)
                if r0 < r1:
                    relevance[:, ka:kb] += p[:, :, r0 - i0:r1 - i0].sum(dim=(1, 2))


def segment_lse(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Natural-log LSE ``[H, T]`` of every row over its segment's keys (non-causal), as an attention forward
    returns it: the ``lse`` argument of ``visual_salience``."""
    H = q.shape[1]
    lse = torch.empty(H, q.shape[0], dtype=torch.float32, device=q.device)
    for a, b in _segments(cu_seqlens):
        for r0 in range(a, b, _row_chunk(H, b - a)):
            r1 = min(b, r0 + _row_chunk(H, b - a))
            s = torch.matmul(q[r0:r1].float().transpose(0, 1), k[a:b].float().permute(1, 2, 0)) * scale
            lse[:, r0:r1] = torch.logsumexp(s, dim=-1)
    return lse


def kv_relevance(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                 causal: bool, rel_rows: torch.Tensor, relevance: torch.Tensor) -> None:
    """``relevance[g, j] = sum_{h: h//G == g} sum_{i in rel_rows} exp(scale q_i.k_j - lse[h, i])`` (visible j)."""
    Hq, Hk = q.shape[1], k.shape[1]
    G = Hq // Hk
    relevance.zero_()
    for (qa, qb), (ka, kb), (r0, r1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k), rel_rows.tolist()):
        m, n = qb - qa, kb - ka
        step = _row_chunk(Hq, max(n, 1))
        for i0 in range(r0, r1, step):
            i1 = min(r1, i0 + step)
            p, _ = _attend_chunk(q[qa + i0:qa + i1], k[ka:kb], G, scale, causal, i0, m, n,
                                 lse_rows=lse[:, qa + i0:qa + i1])
            relevance[:, ka:kb] += p.sum(dim=(1, 2))


def select_kv(scores: torch.Tensor, vis_start: torch.Tensor, vis_end: torch.Tensor, keep: int,
              indices: torch.Tensor) -> None:
    """Top-``keep`` positions of ``scores[..., b, g, vs_b:ve_b]`` per (layer, b, g), ties to the lower
    position, sorted by position; ``indices[..., keep_b:] = -1`` where ``keep_b = min(keep, ve_b - vs_b)``.

    ``scores`` is [B, Hk, T] or stacked over layers [L, B, Hk, T]; ``indices`` matches with T -> keep.
    """
    indices.fill_(-1)
    for b, (vs, ve) in enumerate(zip(vis_start.tolist(), vis_end.tolist())):
        kb = min(keep, ve - vs)
        if kb <= 0:
            continue
        span = scores[..., b, :, vs:ve].float()
        order = torch.sort(span, dim=-1, descending=True, stable=True).indices[..., :kb]
        indices[..., b, :, :kb] = (torch.sort(order, dim=-1).values + vs).to(indices.dtype)


def packed_positions(indices_bg: torch.Tensor, vs: int, ve: int, t_b: int) -> torch.Tensor:
    """Cache positions held by one packed (b, g) row: ``[0, vs)``, the selected indices, ``[ve, t_b)``."""
    sel = indices_bg[indices_bg >= 0].long()
    dev = indices_bg.device
    return torch.cat([torch.arange(vs, device=dev), sel, torch.arange(ve, t_b, device=dev)])


def pack_kv(k, v, indices: torch.Tensor, vis_start: torch.Tensor, vis_end: torch.Tensor,
            seq_lens: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, lengths: torch.Tensor) -> None:
    """Gather-pack (docs/ops.md, pack_kv) of every layer: ``k_out[l, b, g, :len_b] = k[l][b, g, positions]`` with
    positions ``[0, vs_b) ++ selected ++ [ve_b, T_b)`` in order, and ``lengths[b] = len_b``. ``k, v`` are
    lists of per-layer ``[B, Hk, T, D]``; ``indices`` is ``[L, B, Hk, keep]``; slots past ``len_b`` are left
    untouched."""
    Hk = k[0].shape[1]
    for b, (vs, ve, tb) in enumerate(zip(vis_start.tolist(), vis_end.tolist(), seq_lens.tolist())):
        for layer in range(len(k)):
            for g in range(Hk):
                pos = packed_positions(indices[layer, b, g], vs, ve, tb)
                n = pos.numel()
                k_out[layer, b, g, :n] = k[layer][b, g].index_select(0, pos)
                v_out[layer, b, g, :n] = v[layer][b, g].index_select(0, pos)
        lengths[b] = n


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """``k_cache[b, :, lengths[b]] = k_new[b]`` (same for v), then ``lengths += 1``."""
    cap = k_cache.shape[2]
    for b, n in enumerate(lengths.tolist()):
        if not 0 <= n < cap:
            raise ValueError(f"append_kv: lengths[{b}] = {n} has no free slot in a cache of capacity {cap}")
        k_cache[b, :, n] = k_new[b]
        v_cache[b, :, n] = v_new[b]
    lengths += 1


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` in fp32 (``rotate_half(x) = [-x[D/2:], x[:D/2]]``), unrounded; ``cos, sin``
    broadcast against ``x [..., D]``."""
    xf, half = x.float(), x.shape[-1] // 2
    return xf * cos.float() + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin.float()


def rope_append_kv(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, q_out: torch.Tensor) -> None:
    """``q_out = rope(q)``; ``k_cache[b, :, lengths[b]] = rope(k_new[b])``, ``v_cache[b, :, lengths[b]] = v_new[b]``;
    ``lengths += 1``. ``rope`` with row b's ``cos[b], sin[b]`` (``[B, D]``), rounded once to the output's dtype."""
    c, s = cos[:, None, :], sin[:, None, :]
    q_out.copy_(rope(q, c, s))
    append_kv(rope(k_new, c, s).to(k_cache.dtype), v_new, k_cache, v_cache, lengths)


def _decode_rows(q_b, k_rows, v_rows, scale):
    """Attention of q_b [Hq, D] over k_rows/v_rows [Hk, n, D]: (out [Hq, D] fp32, lse [Hq])."""
    Hq, Hk = q_b.shape[0], k_rows.shape[0]
    G = Hq // Hk
    if k_rows.shape[1] == 0:
        return (torch.zeros(Hq, v_rows.shape[-1], device=q_b.device),
                torch.full((Hq,), float("-inf"), device=q_b.device))
    qf = q_b.float().view(Hk, G, -1)
    s = torch.matmul(qf, k_rows.float().transpose(1, 2)) * scale  # [Hk, G, n]
    L = torch.logsumexp(s, dim=-1, keepdim=True)
    o = torch.matmul(torch.exp(s - L), v_rows.float())  # [Hk, G, D]
    return o.reshape(Hq, -1), L.reshape(Hq)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     out: torch.Tensor, lse: torch.Tensor) -> None:
    """``out[b, h] = softmax(scale q[b,h] . k[b, h//G, :len_b]) v[b, h//G, :len_b]``; ``lse[b, h]`` its LSE."""
    for b, n in enumerate(lengths.tolist()):
        o, L = _decode_rows(q[b], k[b, :, :n], v[b, :, :n], scale)
        out[b] = o.to(out.dtype)
        lse[b] = L


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            indices: torch.Tensor, n_valid: torch.Tensor, scale: float, out: torch.Tensor,
                            lse: torch.Tensor) -> None:
    """Decode over ``k_cache[b, g, indices[b, g, :n_valid_b]]`` (gather instead of a packed cache)."""
    for b, n in enumerate(n_valid.tolist()):
        idx = indices[b, :, :n].long()  # [Hk, n]
        kr = torch.gather(k_cache[b], 1, idx.unsqueeze(-1).expand(-1, -1, k_cache.shape[-1]))
        vr = torch.gather(v_cache[b], 1, idx.unsqueeze(-1).expand(-1, -1, v_cache.shape[-1]))
        o, L = _decode_rows(q[b], kr, vr, scale)
        out[b] = o.to(out.dtype)
        lse[b] = L


def glu_rounded(y: torch.Tensor, out: torch.Tensor) -> None:
    """``out = silu(gate) * up`` of ``y [M, 2N]``'s halves, each step rounded to out's dtype as
    ``F.silu(F.linear(x, W_gate)) * F.linear(x, W_up)`` stores it (the ``glu`` epilogue of the GEMV ops)."""
    gate, up = y.to(out.dtype).split(out.shape[1], dim=1)
    out.copy_(F.silu(gate) * up)


def linear_epilogue(y: torch.Tensor, bias: Optional[torch.Tensor], glu: bool, out: torch.Tensor) -> None:
    """The GEMV ops' output from their fp32 ``y = x W^T``: ``+ bias``, then ``out = y`` or (glu) ``glu_rounded(y)``."""
    if bias is not None:
        y += bias.float()
    if glu:
        glu_rounded(y, out)
    else:
        out.copy_(y)


def rms_normalized(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * g / sqrt(mean(x^2) + eps)`` over each row of ``x``, in fp32 (the GEMV ops' ``norm_weight`` fold)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * norm_weight.float()


def add_residual(residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``out = residual + out`` rounded to out's dtype (the GEMV ops' ``residual`` fold); nothing without one."""
    if residual is not None:
        out.copy_(residual.float() + out.float())


def composed_folds(kernel, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool,
                   norm_weight: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor],
                   out: torch.Tensor) -> None:
    """A GEMV op's folds around ``kernel(x, weight, bias, glu, out)``, a kernel without them: x normalized (rounded
    to its dtype) before, the residual added after."""
    if norm_weight is not None:
        x = rms_normalized(x, norm_weight, eps).to(x.dtype)
    kernel(x, weight, bias, glu, out)
    add_residual(residual, out)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool,
         norm_weight: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``y = x' @ W^T (+ bias)`` in fp32 with ``x' = rms_normalized(x)`` (norm_weight) or x; ``out = y``, or (glu,
    W ``[2N, K]``) ``glu_rounded(y)``; then ``add_residual``."""
    xf = x.float() if norm_weight is None else rms_normalized(x, norm_weight, eps)
    linear_epilogue(xf @ weight.float().t(), bias, glu, out)
    add_residual(residual, out)
