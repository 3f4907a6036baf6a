"""Op 3: top-k selection of visual KV entries and gather-pack into contiguous per-head buffers.

Spans (``vis_start``, ``vis_end``, ``seq_lens``) are host-side Python ints: the caller knows where its
visual tokens are, and the capacity check needs them without a device sync. They are copied to the device
once per call (select/pack runs once per question, never inside the decode loop).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _checks as C
from ._library import define

_TRITON = "sparsevila_ops.triton_kernels.select"
define("select_kv",
       "(Tensor scores, Tensor vis_start, Tensor vis_end, int keep, Tensor(a!) indices) -> ()",
       triton=f"{_TRITON}:select_kv")
define("pack_kv",
       "(Tensor[] k, Tensor[] v, Tensor indices, Tensor vis_start, Tensor vis_end, Tensor seq_lens, "
       "Tensor(a!) k_out, Tensor(b!) v_out, Tensor(c!) lengths) -> ()",
       triton=f"{_TRITON}:pack_kv")

IntOrInts = Union[int, Sequence[int]]


def _per_row(name: str, x: IntOrInts, B: int) -> List[int]:
    vals = [x] * B if isinstance(x, int) and not isinstance(x, bool) else list(x)
    if len(vals) != B:
        raise ValueError(f"{name} must be an int or a sequence of B = {B} ints; got {len(vals)} values")
    for i, val in enumerate(vals):
        C.check_int(f"{name}[{i}]", val)
    return vals


def _spans(vis_start: IntOrInts, vis_end: IntOrInts, seq_lens: Optional[IntOrInts], B: int, T: int):
    vs = _per_row("vis_start", vis_start, B)
    ve = _per_row("vis_end", vis_end, B)
    tl = _per_row("seq_lens", T if seq_lens is None else seq_lens, B)
    for b in range(B):
        if not 0 <= vs[b] <= ve[b] <= tl[b] <= T:
            raise ValueError(f"spans must satisfy 0 <= vis_start <= vis_end <= seq_lens <= T = {T}; got row {b}: "
                             f"vis_start={vs[b]}, vis_end={ve[b]}, seq_lens={tl[b]}")
    return vs, ve, tl


@functools.lru_cache(maxsize=64)
def _on_device(vals: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Host span values as an int32 device tensor; cached, so ``select_kv`` + ``pack_kv`` of one question (and
    repeated questions over the same prompt layout) upload each span list once. The ops never write it."""
    return torch.tensor(vals, dtype=torch.int32).to(device, non_blocking=True)


def _as_i32(vals: List[int], device: torch.device) -> torch.Tensor:
    # Under torch.compile the values become graph constants (or guarded symbols): build the tensor in the
    # graph rather than through the cache, which Dynamo would trace around.
    make = _on_device.__wrapped__ if torch.compiler.is_compiling() else _on_device
    return make(tuple(vals), torch.device(device))


def select_kv(scores: torch.Tensor, vis_start: IntOrInts, vis_end: IntOrInts, keep: int, *,
              indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per (layer, b, g): the ``keep_b = min(keep, vis_end_b - vis_start_b)`` highest ``scores`` inside the
    visual span, ties to the lower position, returned sorted by position (absolute cache positions).

    Args:
        scores: fp32 ``[B, Hk, T]`` or stacked over layers ``[L, B, Hk, T]`` (e.g. prefill relevance).
        vis_start, vis_end: the visual span ``[vs_b, ve_b)`` of each batch row (an int for all rows).
        keep: tokens kept per (b, g), ``0 <= keep <= T``.
    Returns int32 indices ``[..., B, Hk, keep]``; unused tail slots (``keep > keep_b``) are -1.
    """
    C.check_tensor("scores", scores, dtypes=(torch.float32,))
    if scores.dim() not in (3, 4):
        raise ValueError(f"scores must be [B, Hk, T] or [L, B, Hk, T]; got shape {tuple(scores.shape)}")
    B, T = scores.shape[-3], scores.shape[-1]
    C.check_int("keep", keep, lo=0, hi=T)
    vs, ve, _ = _spans(vis_start, vis_end, None, B, T)
    shape = (*scores.shape[:-1], keep)
    if indices is None:
        indices = torch.empty(shape, dtype=torch.int32, device=scores.device)
    else:
        C.check_out("indices", indices, shape, torch.int32, scores.device)
    s4 = scores if scores.dim() == 4 else scores.unsqueeze(0)
    torch.ops.sparsevila.select_kv(s4, _as_i32(vs, scores.device), _as_i32(ve, scores.device), keep,
                                   indices.view(s4.shape[0], *indices.shape[-3:]))
    return indices


def _layers(name: str, t) -> List[torch.Tensor]:
    if isinstance(t, torch.Tensor):
        if t.dim() == 4:
            return [t]
        if t.dim() == 5:
            return list(t.unbind(0))
        raise ValueError(f"{name} must be [B, Hk, T, D], stacked [L, B, Hk, T, D], or a list of [B, Hk, T, D]; "
                         f"got shape {tuple(t.shape)}")
    return list(t)


def _check_pack_indices(indices: torch.Tensor, vs: List[int], ve: List[int], layer_given: bool) -> None:
    """Row (l, b, g) of ``indices [L, B, Hk, keep]``: ``keep_b = min(keep, ve_b - vs_b)`` cache positions in
    ``[vs_b, ve_b)``, then -1. Errors name the entry as the caller indexed it (no l for a 3-D ``indices``)."""
    keep, dev = indices.shape[-1], indices.device
    lo = _as_i32(vs, dev).view(1, -1, 1, 1)  # the op's own (cached) upload of the spans
    hi = _as_i32(ve, dev).view(1, -1, 1, 1)
    kept = torch.arange(keep, device=dev) < (hi - lo).clamp(max=keep)
    bad = torch.where(kept, (indices < lo) | (indices >= hi), indices != -1)
    if not bad.any():
        return
    pos = tuple(bad.nonzero()[0].tolist())
    b, j = pos[1], pos[3]
    name = f"indices[{', '.join(map(str, pos if layer_given else pos[1:]))}]"
    kb = min(keep, ve[b] - vs[b])
    got = int(indices[pos])
    if j < kb:
        raise ValueError(f"{name} must lie in [vis_start, vis_end) = [{vs[b]}, {ve[b]}) (the first keep_b = "
                         f"min(keep, vis_end - vis_start) = {kb} entries of a row are visual cache positions); "
                         f"got {got}")
    raise ValueError(f"{name} must be -1 (the tail past keep_b = min(keep, vis_end - vis_start) = {kb} entries "
                     f"of a row is unused); got {got}")


def pack_kv(k, v, indices: torch.Tensor, vis_start: IntOrInts, vis_end: IntOrInts, capacity: int,
            seq_lens: Optional[IntOrInts] = None, *, k_out: Optional[torch.Tensor] = None,
            v_out: Optional[torch.Tensor] = None,
            lengths: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the kept cache entries into contiguous per-head buffers, all layers in one op.

    Packed row (l, b, g) holds, in position order, ``[0, vs_b)``, the selected visual positions
    ``indices[l, b, g, :keep_b]``, then ``[ve_b, T_b)``; ``lengths[b]`` is their count
    ``vs_b + keep_b + T_b - ve_b``. Slots past ``lengths[b]`` are left as they were (decode appends there).

    Args:
        k, v: per-layer caches: a list of ``[B, Hk, T, D]`` (HF ``DynamicCache`` layout, strides free) or one
            stacked ``[L, B, Hk, T, D]`` tensor (a single ``[B, Hk, T, D]`` is one layer).
        indices: int32 ``[L, B, Hk, keep]`` from ``select_kv`` (``[B, Hk, keep]`` for one layer): row (l, b, g)
            holds ``keep_b = min(keep, ve_b - vs_b)`` positions in ``[vs_b, ve_b)``, then -1 (checked on CPU
            tensors and under ``SPARSEVILA_DEBUG=1``).
        capacity: packed slots per row, >= the longest packed row plus the tokens still to be generated.
        seq_lens: valid length ``T_b`` of each batch row (default T).
    Returns ``(k_packed, v_packed, lengths)``: ``[L, B, Hk, capacity, D]`` (no L dim for one 4-D layer) and
    int32 ``[B]``.
    """
    single = isinstance(k, torch.Tensor) and k.dim() == 4
    ks, vs_ = _layers("k", k), _layers("v", v)
    if len(ks) == 0 or len(ks) != len(vs_):
        raise ValueError(f"k and v must hold the same number (>= 1) of layers; got {len(ks)} and {len(vs_)}")
    C.check_tensor("k[0]", ks[0], ndim=4)
    sig = (ks[0].shape, ks[0].dtype, ks[0].device)
    for name, layers in (("k", ks), ("v", vs_)):
        for i, t in enumerate(layers):
            # Fast path (28+ layers per call): one tuple compare; the named checks run only on a mismatch.
            if isinstance(t, torch.Tensor) and (t.shape, t.dtype, t.device) == sig and t.stride(-1) == 1:
                continue
            C.check_tensor(f"{name}[{i}]", t, ndim=4)
            C.check_same_dtype(**{"k[0]": ks[0], f"{name}[{i}]": t})
            C.check_same_device(**{"k[0]": ks[0], f"{name}[{i}]": t})
            if t.shape != ks[0].shape:
                raise ValueError(f"every layer of k and v must have shape {tuple(ks[0].shape)}; got {name}[{i}] "
                                 f"{tuple(t.shape)}")
    L = len(ks)
    B, Hk, T, D = ks[0].shape
    C.check_head_dim("k", D)
    layer_given = not (single and indices.dim() == 3)
    if not layer_given:
        indices = indices.unsqueeze(0)
    C.check_tensor("indices", indices, ndim=4, dtypes=(torch.int32,), last_contiguous=False)
    if tuple(indices.shape[:3]) != (L, B, Hk):
        raise ValueError(f"indices must be int32 [L, B, Hk, keep] = [{L}, {B}, {Hk}, keep]; got {tuple(indices.shape)}")
    C.check_same_device(k=ks[0], indices=indices)
    keep = indices.shape[-1]
    vs, ve, tl = _spans(vis_start, vis_end, seq_lens, B, T)
    if C.value_checks_enabled(indices):
        _check_pack_indices(indices, vs, ve, layer_given)
    C.check_int("capacity", capacity, lo=1)
    need = max(vs[b] + min(keep, ve[b] - vs[b]) + tl[b] - ve[b] for b in range(B))
    if capacity < need:
        raise ValueError(f"capacity must be >= the longest packed row ({need} = prefix + kept + suffix); got {capacity}")
    dev, dt = ks[0].device, ks[0].dtype
    shape = (L, B, Hk, capacity, D)
    if k_out is None:
        k_out = torch.empty(shape, dtype=dt, device=dev)
        v_out = torch.empty(shape, dtype=dt, device=dev) if v_out is None else v_out
    for name, o in (("k_out", k_out), ("v_out", v_out)):
        if o is None:
            raise ValueError(f"{name} must be given when the other packed buffer is")
        C.check_out(name, o, shape[1:] if single and o.dim() == 4 else shape, dt, dev)
    if lengths is None:
        lengths = torch.empty(B, dtype=torch.int32, device=dev)
    else:
        C.check_out("lengths", lengths, (B,), torch.int32, dev)
    k5, v5 = k_out.view(shape), v_out.view(shape)
    torch.ops.sparsevila.pack_kv(ks, vs_, indices, _as_i32(vs, dev), _as_i32(ve, dev), _as_i32(tl, dev),
                                 k5, v5, lengths)
    if single:
        return k5[0], v5[0], lengths
    return k5, v5, lengths


def select_pack_kv(scores: torch.Tensor, k, v, vis_start: IntOrInts, vis_end: IntOrInts, keep: int,
                   capacity: int, seq_lens: Optional[IntOrInts] = None):
    """``select_kv`` then ``pack_kv`` for every layer: two launches for the whole model.

    Returns ``(k_packed, v_packed, lengths, indices)``.
    """
    indices = select_kv(scores, vis_start, vis_end, keep)
    kp, vp, lengths = pack_kv(k, v, indices, vis_start, vis_end, capacity, seq_lens)
    return kp, vp, lengths, indices


def prune_visual_tokens(salience: torch.Tensor, seg_lens: Sequence[int], keep_ratio: float, *,
                        group: int = 1) -> torch.Tensor:
    """Query-agnostic pruning before the LLM: per image/video segment keep the most salient tokens.

    ``salience`` is fp32 ``[T]`` (e.g. ``visual_salience(...)``), ``seg_lens`` the host-side token count of
    each image/video (summing to T). With ``group > 1`` consecutive groups of ``group`` tokens (Qwen2.5-VL's
    2x2 merge unit) are scored by their mean and kept or dropped together; the result then indexes merged
    tokens. Per segment ``keep_s = max(1, round(keep_ratio * n_s))`` groups are kept (0 for empty segments)
    by the same rule as ``select_kv`` (ties to the lower position). Returns int64 kept indices, ascending,
    into the (merged) token sequence.
    """
    C.check_tensor("salience", salience, ndim=1, dtypes=(torch.float32,))
    C.check_int("group", group, lo=1)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1]; got {keep_ratio}")
    lens = [C.check_int(f"seg_lens[{i}]", n, lo=0) for i, n in enumerate(seg_lens)]
    if sum(lens) != salience.shape[0]:
        raise ValueError(f"seg_lens must sum to salience.shape[0] = {salience.shape[0]}; got {sum(lens)}")
    if any(n % group for n in lens):
        raise ValueError(f"every segment length must be a multiple of group = {group}; got {lens}")
    pooled = salience.view(-1, group).mean(dim=1) if group > 1 else salience
    kept, start = [], 0
    for n in (n // group for n in lens):
        if n:
            keep = max(1, round(keep_ratio * n))
            idx = select_kv(pooled[start:start + n].view(1, 1, n), 0, n, keep)
            kept.append(idx.view(-1).long() + start)
        start += n
    if not kept:
        return torch.empty(0, dtype=torch.long, device=salience.device)
    return torch.cat(kept)
