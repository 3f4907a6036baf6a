"""``SparseVILACache``: the LLM KV cache of the SparseVILA pipeline, for any HF decoder (model-agnostic).

Layout (all layers stacked, so select + pack of the whole model is one launch each):

- full cache ``k, v [L, B, Hk, capacity, D]``: row b holds its valid tokens compacted at ``[0, lengths[l, b])``
  (left padding of the prompt is dropped on write), so every later turn can re-select from it;
- packed cache ``pk, pv [L, B, Hk, packed_capacity, D]``, ``plengths [L, B]``: after each question's prefill,
  per (layer, b, kv head) the prefix before the visual span, the ``keep`` visual entries the question attends
  to most (``select_kv`` on the prefill's relevance), and the suffix; decode runs over it while ``sparse``.
  Sparse decode steps append to the packed cache only; the tokens they add are copied into the full cache at
  the next host sync point (``sync_full``: the end of ``generate``, or the next prefill), so a decode step
  writes one cache, not two.

A prefill (a forward with more than one new token) is announced by ``begin_prefill`` (host-side: the rows'
left padding, the visual spans, the tokens still to be generated); decode steps (one new token) touch only
device tensors (``append_kv`` at ``lengths``, or ``rope_append_kv`` through ``rope_append``, and
``decode_attention``), so the decode step captures in a CUDA graph with static buffer addresses.
``get_seq_length`` is the HF length (positions processed, padding included).
"""
from __future__ import annotations

import contextlib
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import utils as gen_utils

from ..decode import append_kv, rope_append_kv
from ..select import pack_kv, select_kv

PACK_ALIGN = 512  # the packed cache's capacity is a multiple of this many tokens


class SparseVILALayer(CacheLayerMixin):
    """One layer's view of a ``SparseVILACache``; HF's ``update`` writes through it."""

    is_compileable = True
    is_croppable = True  # the cache rolls back whole decode steps (``SparseVILACache.crop``)
    is_sliding = False

    def __init__(self, cache: "SparseVILACache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The layers share the cache's stacked buffers: the first layer to see a tensor allocates them."""
        if not self.cache.allocated:
            self.cache._allocate(key_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens into the full cache (and, while ``sparse``, the packed cache); returns them
        unchanged: the SparseVILA attention function reads the cache itself."""
        self.lazy_initialization(key_states, value_states)
        self.cache._write(self.layer_idx, key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.cache.capacity, 0

    def get_seq_length(self):
        return self.cache.seen if self.cache.allocated else 0

    def get_max_length(self) -> int:
        return self.cache.capacity

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size_

    def reset(self) -> None:
        self.cache.reset()


class SparseVILACache(Cache):
    """Full + packed KV cache for ``num_layers`` decoder layers; ``capacity`` tokens per row (grown on a later
    prefill if a turn needs more). ``keep_ratio`` = 1 - decode sparsity (1: dense decode over the full cache)."""

    def __init__(self, num_layers: int, capacity: int, keep_ratio: float = 1.0, cuda_graph: bool = True):
        super().__init__(layers=[SparseVILALayer(self, i) for i in range(num_layers)])
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1]; got {keep_ratio}")
        self.num_layers, self.capacity, self.keep_ratio = num_layers, int(capacity), float(keep_ratio)
        for layer in self.layers:
            layer.is_compileable = bool(cuda_graph)
        self.allocated = False
        self.batch_size_ = -1
        self.k = self.v = self.lengths = self.seen = None
        self.pk = self.pv = self.plengths = None
        self.sparse = False  # decode reads the packed cache
        self._packed_from: List[Tuple[int, int]] = []  # per row: (full, packed) lengths when the packing ended
        self.indices: Optional[torch.Tensor] = None  # the last selection, int32 [L, B, Hk, keep]
        # set by an integration that pruned the first prompt: (its length, the pruned ids, the pruned mask)
        self.prompt_map: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None
        # host state of the current prefill (set by begin_prefill)
        self.host_lens: List[int] = []
        self.vis_spans: List[Tuple[int, int]] = []
        self._pads: List[int] = []
        self._prev: List[int] = []
        self._reserve = 0
        self.prefill: Optional[dict] = None

    # -- storage -------------------------------------------------------------------------------------------
    def _allocate(self, like: torch.Tensor) -> None:
        B, Hk, _, D = like.shape
        L, dev, dt = self.num_layers, like.device, like.dtype
        self.batch_size_ = B
        self.k = torch.zeros(L, B, Hk, self.capacity, D, dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(L, B, dtype=torch.int32, device=dev)
        self.seen = torch.zeros((), dtype=torch.long, device=dev)
        self.host_lens = [0] * B
        self.allocated = True
        self._mark_static(self.k, self.v, self.lengths, self.seen)

    @staticmethod
    def _mark_static(*tensors: torch.Tensor) -> None:
        """Fixed addresses (CUDA graphs replay in place) and static sizes: a new cache size recompiles the decode
        step rather than making its sizes symbolic (inductor then wrote appends to the packed cache's views
        wrongly; bench/NOTES.md)."""
        if not torch.compiler.is_compiling():
            for t in tensors:
                torch._dynamo.mark_static_address(t)
                torch._dynamo.mark_static(t)

    def _grow(self, need: int) -> None:
        """Reallocate the full cache to hold ``need`` tokens per row (prefill only, never in a graph)."""
        cap = max(need, 2 * self.capacity)
        k = self.k.new_zeros(*self.k.shape[:3], cap, self.k.shape[-1])
        v = torch.zeros_like(k)
        k[..., :self.capacity, :].copy_(self.k)
        v[..., :self.capacity, :].copy_(self.v)
        self.k, self.v, self.capacity = k, v, cap
        self._mark_static(self.k, self.v)

    # -- prefill -------------------------------------------------------------------------------------------
    def begin_prefill(self, like: torch.Tensor, q_len: int, pads: Optional[Sequence[int]] = None,
                      vis_spans: Optional[Sequence[Tuple[int, int]]] = None, reserve: int = 0) -> None:
        """Announce a forward of ``q_len`` new tokens per row, of which the first ``pads[b]`` are left padding.

        ``vis_spans[b] = (vs, ve)``: the visual span of row b relative to its first valid new token (None: this
        chunk holds no visual token, keep the spans of the previous turn). ``reserve``: tokens still to be
        generated after this prefill (sizes the packed cache).
        """
        if not self.allocated:
            self._allocate(like)
        self.sync_full()
        B = self.batch_size_
        pads = [0] * B if pads is None else [int(p) for p in pads]
        if len(pads) != B or any(not 0 <= p <= q_len for p in pads):
            raise ValueError(f"pads must be {B} ints in [0, {q_len}]; got {pads}")
        prev = self.lengths[0].tolist()
        new = [p + q_len - pad for p, pad in zip(prev, pads)]
        if max(new) + reserve > self.capacity:
            self._grow(max(new) + reserve)
        if vis_spans is not None:
            self.vis_spans = [(p + vs, p + ve) for p, (vs, ve) in zip(prev, vis_spans)]
        elif not self.vis_spans:
            self.vis_spans = [(p, p) for p in prev]
        self._pads, self._prev, self.host_lens, self._reserve = pads, prev, new, int(reserve)
        self.lengths.copy_(torch.tensor(new, dtype=torch.int32).expand(self.num_layers, B))
        dev = self.k.device
        n_q = [q_len - pad for pad in pads]
        ve_rel = [min(max(ve - p, 0), n) for (vs, ve), p, n in zip(self.vis_spans, prev, n_q)]
        want_rel = self.keep_ratio < 1.0
        self.prefill = {
            "cu_q": _cumsum(n_q, dev), "cu_k": _cumsum(new, dev), "max_q": max(n_q), "max_k": max(new),
            "rel_rows": (torch.tensor([[r, n] for r, n in zip(ve_rel, n_q)], dtype=torch.int32,
                                                  device=dev) if want_rel else None),
            "scores": (torch.zeros(self.num_layers, B, self.k.shape[2], max(new), dtype=torch.float32, device=dev)
                       if want_rel else None),
        }
        self.sparse = False

    def decoding(self) -> bool:
        """A decode step writes next (one token per row, device-side; no prefill announced)."""
        return self.allocated and self.prefill is None

    def rope_append(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """A decode step's ``update`` with the rotary embedding fused in (``rope_append_kv``, one launch): the
        rotated new key and the value go where ``_write`` puts them (the packed cache while ``sparse``);
        returns the rotated query. ``q [B, Hq, D]``, ``k, v [B, Hk, D]``, ``cos, sin [B, D]``."""
        return rope_append_kv(q, k, v, cos, sin, *self._decode_slot(layer))

    def _decode_slot(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, lengths)`` a decode step of ``layer`` appends to: the packed cache while ``sparse`` (the full
        cache catches up in ``sync_full``); counts the step once (at layer 0) in ``seen``."""
        if layer == 0:
            self.seen.add_(1)
        if self.sparse:
            return self.pk[layer], self.pv[layer], self.plengths[layer]
        return self.k[layer], self.v[layer], self.lengths[layer]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        q_len = k.shape[2]
        if q_len == 1 and self.prefill is None:  # decode step: device-side append, graph-capturable
            append_kv(k[:, :, 0], v[:, :, 0], *self._decode_slot(layer))
            return
        if self.prefill is None:
            self.begin_prefill(k, q_len)
        if layer == 0:
            self.seen.add_(q_len)
        for b, (pad, p) in enumerate(zip(self._pads, self._prev)):
            n = q_len - pad
            self.k[layer, b, :, p:p + n].copy_(k[b, :, pad:])
            self.v[layer, b, :, p:p + n].copy_(v[b, :, pad:])

    def end_prefill(self) -> None:
        """After the last layer's prefill: select + pack every layer when decode is sparse."""
        if self.keep_ratio < 1.0:
            self._select_and_pack()
        self.prefill = None

    def _select_and_pack(self) -> None:
        """Per (layer, b, kv head) keep ``round(keep_ratio * n_vis_b)`` visual entries by relevance; pack."""
        scores = self.prefill["scores"]
        lens = self.host_lens
        vs = [s for s, _ in self.vis_spans]
        ve = [e for _, e in self.vis_spans]
        keeps = [max(1, round(self.keep_ratio * (e - s))) if e > s else 0 for s, e in zip(vs, ve)]
        need = max(s + kb + n - e for s, e, kb, n in zip(vs, ve, keeps, lens)) + self._reserve
        L, B, Hk, _, D = self.k.shape
        if self.pk is None or self.pk.shape[3] < need or self.pk.shape[1] != B:
            # whole PACK_ALIGN blocks: a reused cache keeps its packed buffers (and graphs) for similar prompts
            need = -(-need // PACK_ALIGN) * PACK_ALIGN
            self.pk = self.k.new_zeros(L, B, Hk, need, D)
            self.pv = torch.zeros_like(self.pk)
            self.plengths = torch.zeros(L, B, dtype=torch.int32, device=self.k.device)
            self._mark_static(self.pk, self.pv, self.plengths)
        cap = self.pk.shape[3]
        self._packed_from = [(n, s + kb + n - e) for s, e, kb, n in zip(vs, ve, keeps, lens)]
        if len(set(keeps)) == 1:  # one launch each for every layer and row
            self.indices = select_kv(scores, vs, ve, keeps[0])
            _, _, lengths = pack_kv(self.k, self.v, self.indices, vs, ve, cap, seq_lens=lens, k_out=self.pk,
                                    v_out=self.pv)
            self.plengths.copy_(lengths.expand(L, B))
        else:  # rows with different visual spans keep different counts: one select + pack per row
            self.indices = torch.full((L, B, Hk, max(keeps)), -1, dtype=torch.int32, device=self.k.device)
            for b in range(B):
                idx = select_kv(scores[:, b:b + 1], vs[b], ve[b], keeps[b])
                kp, vp, lengths = pack_kv(self.k[:, b:b + 1], self.v[:, b:b + 1], idx, vs[b], ve[b], cap,
                                          seq_lens=[lens[b]])
                self.pk[:, b:b + 1].copy_(kp)
                self.pv[:, b:b + 1].copy_(vp)
                self.plengths[:, b].copy_(lengths.expand(L))
                self.indices[:, b:b + 1, :, :keeps[b]].copy_(idx)
        self.sparse = True

    def sync_full(self) -> None:
        """Copy the tokens decoded over the packed cache since the packing into the full cache and advance its
        lengths (one host sync; a no-op unless ``sparse``). Every layer and row decodes in step, so row b's new
        tokens are the packed slots ``[p_b, plengths[0, b])``, which go to ``[f_b, ...)`` of the full rows."""
        if not self.sparse or not self._packed_from:
            return
        for b, (n, (f, p)) in enumerate(zip(self.plengths[0].tolist(), self._packed_from)):
            d = n - p
            self.k[:, b, :, f:f + d].copy_(self.pk[:, b, :, p:n])
            self.v[:, b, :, f:f + d].copy_(self.pv[:, b, :, p:n])
            self.lengths[:, b].fill_(f + d)

    def graph_key(self) -> tuple:
        """What a captured decode step depends on (``step_graph`` keys its graphs on it): the path (``sparse``:
        the packed cache) and the buffers it reads and writes."""
        return (self.sparse, *(t.data_ptr() for t in (self.k, self.v, self.lengths, self.seen, self.pk, self.pv,
                                                     self.plengths) if t is not None))

    # -- HF Cache API --------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0):
        return self.seen if self.allocated else 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.capacity

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (and so the addresses captured graphs replay on)."""
        if self.allocated:
            self.lengths.zero_()
            self.seen.zero_()
        self.host_lens, self.vis_spans, self.sparse, self.prefill = [0] * max(self.batch_size_, 0), [], False, None
        self.indices = self.prompt_map = None
        self._packed_from = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SparseVILACache does not support beam search (num_beams > 1)")

    def activate_past_recording(self) -> None:
        """Nothing to record: rolling back a decode step only shortens the lengths (``crop``)."""

    def crop(self, tokens_to_remove: int) -> None:
        """Undo the last ``-tokens_to_remove`` decode steps (``tokens_to_remove <= 0``; device-side, no sync):
        transformers' deferred stop check runs one step past the stop and rolls it back. A positive value (crop
        to an absolute length, as assisted decoding asks) is refused. Only steps decoded since the last prefill
        can be removed (not checked: that would cost a device sync)."""
        if tokens_to_remove > 0:
            raise NotImplementedError(f"SparseVILACache can only remove decode steps (tokens_to_remove <= 0); got "
                                      f"{tokens_to_remove} (assisted decoding is not supported)")
        n = -int(tokens_to_remove)
        if n == 0 or not self.allocated:
            return
        self.seen.sub_(n)
        (self.plengths if self.sparse else self.lengths).sub_(n)


def packed_mismatch(cache: SparseVILACache) -> str:
    """Consistency check of a sparse cache (tests, benchmarks, debugging): '' if every packed row (l, b, g) equals
    the full row gathered at ``[0, vs) + indices[l, b, g] + [ve, lengths[l, b])`` (what decode appended included),
    else where the first difference is."""
    cache.sync_full()
    L, B, Hk = cache.k.shape[:3]
    for b in range(B):
        vs, ve = cache.vis_spans[b]
        for layer in range(L):
            n_full = int(cache.lengths[layer, b])
            for g in range(Hk):
                sel = [int(j) for j in cache.indices[layer, b, g] if j >= 0]
                pos = list(range(vs)) + sel + list(range(ve, n_full))
                n = int(cache.plengths[layer, b])
                if n != len(pos):
                    return f"layer {layer} b {b}: packed length {n}, expected {len(pos)}"
                for buf, full, name in ((cache.pk, cache.k, "k"), (cache.pv, cache.v, "v")):
                    bad = [i for i, p in enumerate(pos) if not torch.equal(buf[layer, b, g, i], full[layer, b, g, p])]
                    if bad:
                        return (f"layer {layer} b {b} g {g}: packed {name} slots {bad} of {n} differ from the full "
                                f"cache (length {n_full})")
    return ""


def _cumsum(lens: Sequence[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


_DEFER_LOCK = threading.Lock()
_DEFER_USERS = [0, None]  # [blocks inside deferred_stop_checks, transformers' own is_supported]


@contextlib.contextmanager
def deferred_stop_checks(devices: Sequence[str] = ("cuda",)):
    """Within the block, transformers' ``generate`` decoding into a ``SparseVILACache`` on ``devices`` reads its
    stop flag one step late (``DeferredStopCheck``, which transformers 5.17 enables only on ``mps``): the host
    queues step t+1 while the GPU runs step t instead of waiting for step t's tokens every step. An EOS stop then
    costs one extra step, which ``generate`` rolls back with ``SparseVILACache.crop(-1)``. Other caches keep
    transformers' own choice. Blocks may nest and run on several threads: transformers' check is restored when
    the last one ends."""
    def is_supported(device, cache, cache_is_returned, is_assistant):
        if isinstance(cache, SparseVILACache) and not is_assistant:
            return device.type in devices
        return _DEFER_USERS[1](device, cache, cache_is_returned, is_assistant)

    with _DEFER_LOCK:
        if _DEFER_USERS[0] == 0:
            _DEFER_USERS[1] = gen_utils.DeferredStopCheck.is_supported
        _DEFER_USERS[0] += 1
        gen_utils.DeferredStopCheck.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        with _DEFER_LOCK:
            _DEFER_USERS[0] -= 1
            if _DEFER_USERS[0] == 0:
                gen_utils.DeferredStopCheck.is_supported = staticmethod(_DEFER_USERS[1])
