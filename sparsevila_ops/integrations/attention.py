"""Attention functions the integrations plug into HF models (model-agnostic).

- ``sparsevila_attention``: registered through ``AttentionInterface`` for a decoder's text config. With a
  ``SparseVILACache`` it runs the prefill as one varlen causal ``prefill_attention`` over the compacted rows
  (with the question rows' relevance when decode is sparse, then select + pack of every layer after the last
  one) and each decode step as ``decode_attention`` over the packed (or full) cache.
- ``varlen_attention``: non-causal attention over the segments of a vision encoder (frames, windows), one
  launch for all segments, with the LSE when salience needs it.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..decode import decode_attention
from ..prefill import prefill_attention
from .cache import SparseVILACache

ATTN_NAME = "sparsevila"


class LLMState:
    """Shared by the text attention modules of one enabled model: the cache of the running forward."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.cache: Optional[SparseVILACache] = None


def sparsevila_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, **kwargs) -> Tuple[torch.Tensor, None]:
    """HF attention function: ``query [B, Hq, q, D]``, ``key/value [B, Hk, q, D]`` (the new tokens, as the
    ``SparseVILACache`` returns them) -> ``(out [B, q, Hq, D], None)``. Causality is the kernels' (bottom-right
    aligned); padding is what ``SparseVILACache.begin_prefill`` was told."""
    state: LLMState = module._sparsevila_state
    cache = state.cache
    if cache is None or not cache.allocated:  # a forward without our cache: plain causal attention
        B, Hq, q, D = query.shape
        qv, kv, vv = (t.transpose(1, 2).reshape(B * q, t.shape[1], D) for t in (query, key, value))
        cu = torch.arange(0, (B + 1) * q, q, dtype=torch.int32, device=query.device)
        out, _ = prefill_attention(qv, kv, vv, cu, cu, q, q, scale=scaling, causal=True)
        return out.view(B, q, Hq, D), None
    layer = module.layer_idx
    if cache.prefill is None:  # decode step: the new token is already appended by the cache
        q1 = query[:, :, 0]
        if cache.sparse:
            out, _ = decode_attention(q1, cache.pk[layer], cache.pv[layer], cache.plengths[layer], scale=scaling)
        else:
            out, _ = decode_attention(q1, cache.k[layer], cache.v[layer], cache.lengths[layer], scale=scaling)
        return out.unsqueeze(1), None
    return _prefill(cache, layer, query, scaling), None


def _prefill(cache: SparseVILACache, layer: int, query: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Varlen causal prefill of the new rows against each row's compacted cache ``[0, host_lens[b])``."""
    p = cache.prefill
    B, Hq, q, D = query.shape
    pads, lens = cache._pads, cache.host_lens
    rows = [query[b, :, pad:].transpose(0, 1) for b, pad in enumerate(pads)]
    keys = [cache.k[layer, b, :, :n].transpose(0, 1) for b, n in enumerate(lens)]
    vals = [cache.v[layer, b, :, :n].transpose(0, 1) for b, n in enumerate(lens)]
    qv, kv, vv = (_cat(t) for t in (rows, keys, vals))
    scores = p["scores"]
    if p["rel_rows"] is None:
        out, _ = prefill_attention(qv, kv, vv, p["cu_q"], p["cu_k"], p["max_q"], p["max_k"], scale=scale)
    else:
        rel = scores[layer, 0] if B == 1 else None  # B == 1: the kernel writes straight into the score table
        out, _, rel = prefill_attention(qv, kv, vv, p["cu_q"], p["cu_k"], p["max_q"], p["max_k"], scale=scale,
                                        rel_rows=p["rel_rows"], relevance=rel)
        if B > 1:
            start = 0
            for b, n in enumerate(lens):
                scores[layer, b, :, :n].copy_(rel[:, start:start + n])
                start += n
    if layer == cache.num_layers - 1:
        cache.end_prefill()
    if B == 1 and pads[0] == 0:
        return out.unsqueeze(0)
    full = out.new_zeros(B, q, Hq, D)
    start = 0
    for b, pad in enumerate(pads):
        full[b, pad:] = out[start:start + q - pad]
        start += q - pad
    return full


def _cat(ts: List[torch.Tensor]) -> torch.Tensor:
    """One row is used as the (strided) view it is; several rows are packed into one varlen tensor (a copy)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)


def segment_lengths(cu_seqlens: torch.Tensor) -> List[int]:
    """Host segment lengths of ``cu_seqlens`` (one device sync)."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


SDPA_MIN_SEGMENT = 65  # equal segments at least this long run as one batched SDPA (bench.vision_block, H200:
# prefill_attention 1.08x SDPA on 64-patch windows, SDPA 1.46x prefill_attention on 1024-patch frames)
_SDPA_LSE_REFUSED: set = set()  # (device type, dtype, D) whose LSE kernel raised once (logged once each)
log = logging.getLogger("sparsevila_ops")


def batched_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float, need_lse: bool = False
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Non-causal attention within consecutive segments of ``n`` rows of ``q, k, v [T, H, D]`` (``T % n == 0``) as
    one batched SDPA over ``[T / n, H, n, D]``: ``(out [T, H, D], lse)``. With ``need_lse`` (see
    :func:`sdpa_gives_lse`) ``lse`` is the row log-sum-exp ``[H, T]`` (fp32, natural log of ``sum_j exp(scale q.k)``)
    from the kernel ``F.scaled_dot_product_attention`` would run but does not return it from: cuDNN's on CUDA,
    PyTorch's flash kernel on the CPU; else None."""
    T, H, D = q.shape
    B = T // n
    qb, kb, vb = (t.reshape(B, n, H, D).transpose(1, 2) for t in (q, k, v))
    if not need_lse:
        return F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2).reshape(T, H, D), None
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, scale=scale)
    lse = lse.reshape(B, H, n).transpose(0, 1).reshape(H, T)
    return out.transpose(1, 2).reshape(T, H, D), lse.float().contiguous()


def sdpa_gives_lse(q: torch.Tensor) -> bool:
    """Whether :func:`batched_sdpa` can return the LSE for ``q``: on the CPU, and on CUDA in fp16 / bf16 with
    cuDNN's attention enabled (it has no fp32 kernel)."""
    if not q.is_cuda:
        return True
    return q.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.cudnn_sdp_enabled()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     lens: List[int], scale: float, need_lse: bool = False):
    """Non-causal attention within each segment of ``q, k, v [T, H, D]``: one launch for every segment.

    Segments of equal length of at least ``SDPA_MIN_SEGMENT`` (video frames) run as one batched SDPA, the fastest
    route measured for them (with ``need_lse`` where :func:`sdpa_gives_lse`, and where that kernel raises, the
    general route below, with one warning per device type, dtype and head dim); others (Qwen2.5-VL's 64-patch windows,
    uneven segments) as one varlen ``prefill_attention``. With ``need_lse`` the LSE ``[H, T]`` is the second value
    (else None).
    """
    if lens and len(set(lens)) == 1 and lens[0] >= SDPA_MIN_SEGMENT and (not need_lse or sdpa_gives_lse(q)):
        try:
            return batched_sdpa(q, k, v, lens[0], scale, need_lse)
        except RuntimeError as e:  # a GPU or shape the private LSE kernel refuses: the general route below
            if not need_lse or isinstance(e, torch.OutOfMemoryError):
                raise
            key = (q.device.type, q.dtype, q.shape[-1])
            if key not in _SDPA_LSE_REFUSED:
                _SDPA_LSE_REFUSED.add(key)
                log.warning("sparsevila_ops: SDPA's LSE kernel refused %s %s D=%d (%s); prefill_attention instead",
                            *key, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    cu = cu_seqlens.to(torch.int32)
    mx = max(lens) if lens else 0
    out, lse = prefill_attention(q, k, v, cu, cu, mx, mx, scale=scale, causal=False)
    return out, (lse if need_lse else None)
