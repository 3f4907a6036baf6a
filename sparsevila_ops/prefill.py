"""Op 2: varlen causal GQA prefill attention, optionally fused with query-aware KV relevance."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks as C
from ._library import define

_TRITON = "sparsevila_ops.triton_kernels.prefill"
_COMMON = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
           "bool causal")
define("prefill_attention",
       f"(Tensor q, Tensor k, Tensor v, {_COMMON}, Tensor(a!) out, Tensor(b!) lse) -> ()",
       triton=f"{_TRITON}:prefill_attention")
define("prefill_attention_relevance",
       f"(Tensor q, Tensor k, Tensor v, {_COMMON}, Tensor rel_rows, Tensor(a!) out, Tensor(b!) lse, "
       "Tensor(c!) relevance) -> ()",
       triton=f"{_TRITON}:prefill_attention_relevance")
define("kv_relevance",
       f"(Tensor q, Tensor k, Tensor lse, {_COMMON}, Tensor rel_rows, Tensor(a!) relevance) -> ()",
       triton=f"{_TRITON}:kv_relevance")


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_rows):
    C.check_tensor("q", q, ndim=3)
    C.check_tensor("k", k, ndim=3)
    C.check_same_dtype(q=q, k=k)
    C.check_same_device(q=q, k=k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, rel_rows=rel_rows)
    Tq, Hq, D = q.shape
    Tk, Hk, Dk = k.shape
    if Dk != D:
        raise ValueError(f"k head dim must equal q's ({D}); got {Dk}")
    C.check_head_dim("q", D)
    C.check_gqa(Hq, Hk)
    S = C.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq, "max_seqlen_q", max_seqlen_q)
    Sk = C.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, Tk, "max_seqlen_k", max_seqlen_k)
    if S != Sk:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments; got {S} and {Sk}")
    if rel_rows is not None:
        C.check_tensor("rel_rows", rel_rows, ndim=2, dtypes=(torch.int32,), last_contiguous=False)
        if tuple(rel_rows.shape) != (S, 2):
            raise ValueError(f"rel_rows must be int32 of shape [S, 2] = [{S}, 2]; got {tuple(rel_rows.shape)}")
        if C.value_checks_enabled(rel_rows):
            cq = cu_seqlens_q.tolist()
            for s, (r0, r1) in enumerate(rel_rows.tolist()):
                m = cq[s + 1] - cq[s]
                if not 0 <= r0 <= r1 <= m:
                    raise ValueError(f"rel_rows[{s}] must satisfy 0 <= r0 <= r1 <= {m} (rows of segment {s}, "
                                     f"relative to its first query); got [{r0}, {r1}]")
    return Tq, Hq, D, Tk, Hk


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                      scale: Optional[float] = None, causal: bool = True, rel_rows: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                      relevance: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Varlen FlashAttention2-style forward, optionally returning query-aware relevance of every KV entry.

    Segment s has m query rows and n keys; row i sees key j in [0, n) and, with ``causal``, only
    ``j <= i + (n - m)`` (bottom-right alignment: a query chunk against a longer cache)::

        out[i, h]       = sum_j P[h, i, j] v[j, h // G]                 (q's dtype, [Tq, Hq, D])
        lse[h, i]       = log sum_j exp(scale q[i, h] . k[j, h // G])   (fp32 [Hq, Tq]; -inf if no key seen)
        relevance[g, j] = sum_{h // G == g} sum_{i in [r0, r1)} P[h, i, j]   (fp32 [Hk, Tk])

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hk, D]`` with Hq = G*Hk; fp16/bf16/fp32; last dim contiguous.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S+1]`` offsets; max_seqlen_q/k: Python ints.
        rel_rows: int32 ``[S, 2]``, per segment the question rows ``[r0, r1)`` (relative to the segment's
            first query) whose attention is summed into ``relevance``. None: plain attention.
    Returns ``(out, lse)`` or, with ``rel_rows``, ``(out, lse, relevance)``.
    """
    Tq, Hq, D, Tk, Hk = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_rows)
    C.check_tensor("v", v, ndim=3)
    C.check_same_dtype(q=q, v=v)
    C.check_same_device(q=q, v=v)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}; got {tuple(v.shape)}")
    scale = C.check_scale(scale, D)
    if out is None:
        out = torch.empty(Tq, Hq, D, dtype=q.dtype, device=q.device)
    else:
        C.check_out("out", out, (Tq, Hq, D), q.dtype, q.device)
    if lse is None:
        lse = torch.empty(Hq, Tq, dtype=torch.float32, device=q.device)
    else:
        C.check_out("lse", lse, (Hq, Tq), torch.float32, q.device)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))
    if rel_rows is None:
        torch.ops.sparsevila.prefill_attention(*args, out, lse)
        return out, lse
    if relevance is None:
        relevance = torch.empty(Hk, Tk, dtype=torch.float32, device=q.device)
    else:
        C.check_out("relevance", relevance, (Hk, Tk), torch.float32, q.device)
    torch.ops.sparsevila.prefill_attention_relevance(*args, rel_rows, out, lse, relevance)
    return out, lse, relevance


def kv_relevance(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, rel_rows: torch.Tensor, *,
                 scale: Optional[float] = None, causal: bool = True,
                 relevance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relevance of every KV entry to the question rows, when attention ran elsewhere and returned its LSE.

    ``relevance[g, j] = sum_{h // G == g} sum_{i in [r0, r1)} exp(scale q[i, h] . k[j, g] - lse[h, i])`` over
    keys that row i sees (same masking as ``prefill_attention``): equal to the ``relevance`` that
    ``prefill_attention(..., rel_rows=...)`` returns. ``lse`` is fp32 ``[Hq, Tq]`` (only rel rows are read).
    """
    Tq, Hq, D, Tk, Hk = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_rows)
    if rel_rows is None:
        raise TypeError("rel_rows must be an int32 tensor [S, 2]; got None")
    C.check_lse("lse", lse, Hq, Tq)
    C.check_same_device(q=q, lse=lse)
    scale = C.check_scale(scale, D)
    if relevance is None:
        relevance = torch.empty(Hk, Tk, dtype=torch.float32, device=q.device)
    else:
        C.check_out("relevance", relevance, (Hk, Tk), torch.float32, q.device)
    torch.ops.sparsevila.kv_relevance(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                      bool(causal), rel_rows, relevance)
    return relevance
