"""Op 4: decode attention over the packed cache, in-place append (also fused with the step's rotary embedding),
and the gather-in-kernel comparison op.

Everything here is CUDA-graph capturable: no host syncs, fixed-capacity buffers, lengths live on the device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks as C
from ._library import define

_TRITON = "sparsevila_ops.triton_kernels.decode"
define("decode_attention",
       "(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale, Tensor(a!) out, Tensor(b!) lse) -> ()",
       triton=f"{_TRITON}:decode_attention", cuda="sparsevila_ops.cuda_decode:decode_attention")
define("append_kv",
       "(Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths) -> ()",
       triton=f"{_TRITON}:append_kv")
define("rope_append_kv",
       "(Tensor q, Tensor k_new, Tensor v_new, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
       "Tensor(c!) lengths, Tensor(d!) q_out) -> ()",
       triton=f"{_TRITON}:rope_append_kv")
define("sparse_decode_attention",
       "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, Tensor n_valid, float scale, Tensor(a!) out, "
       "Tensor(b!) lse) -> ()",
       triton=f"{_TRITON}:sparse_decode_attention")


def _check_cache(q, k, v, q_name="q", k_name="k", v_name="v", same_heads=False):
    C.check_tensor(q_name, q, ndim=3)
    C.check_tensor(k_name, k, ndim=4)
    C.check_tensor(v_name, v, ndim=4)
    C.check_same_dtype(**{q_name: q, k_name: k, v_name: v})
    C.check_same_device(**{q_name: q, k_name: k, v_name: v})
    B, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{v_name} must have the shape of {k_name} {tuple(k.shape)}; got {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{k_name} must be [B, Hk, capacity, D] = [{B}, Hk, capacity, {D}]; got {tuple(k.shape)}")
    C.check_head_dim(q_name, D)
    if same_heads and k.shape[1] != Hq:
        raise ValueError(f"{q_name} heads ({Hq}) must equal {k_name} heads ({k.shape[1]})")
    C.check_gqa(Hq, k.shape[1], q_name, k_name)
    return B, Hq, D, k.shape[2]


def _check_lengths(name: str, lengths, B: int, hi: int, ref_name: str, ref: torch.Tensor) -> None:
    C.check_tensor(name, lengths, ndim=1, dtypes=(torch.int32,), last_contiguous=False)
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"{name} must be int32 of shape [B] = [{B}]; got {tuple(lengths.shape)}")
    C.check_same_device(**{ref_name: ref, name: lengths})
    if C.value_checks_enabled(lengths):
        bad = [(b, n) for b, n in enumerate(lengths.tolist()) if not 0 <= n <= hi]
        if bad:
            raise ValueError(f"{name} must lie in [0, {hi}]; got {name}[{bad[0][0]}] = {bad[0][1]}")


def _outputs(q, out, lse):
    B, Hq, D = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        C.check_out("out", out, (B, Hq, D), q.dtype, q.device)
    if lse is None:
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    else:
        C.check_out("lse", lse, (B, Hq), torch.float32, q.device)
    return out, lse


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                     scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                     lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step over a (packed) cache with per-row lengths::

        out[b, h] = sum_{j < len_b} softmax_j(scale q[b, h] . k[b, h // G, j]) v[b, h // G, j]
        lse[b, h] = log sum_{j < len_b} exp(scale q[b, h] . k[b, h // G, j])   (-inf, out 0 when len_b == 0)

    Args:
        q: ``[B, Hq, D]`` the new token's queries; k, v: ``[B, Hk, capacity, D]`` (strides free, last dim
            contiguous); lengths: int32 ``[B]`` on the device, ``0 <= len_b <= capacity``.
    Returns ``(out [B, Hq, D] in q's dtype, lse fp32 [B, Hq])``. Split-KV on the Triton backend.
    """
    B, Hq, D, cap = _check_cache(q, k, v)
    _check_lengths("lengths", lengths, B, cap, "q", q)
    scale = C.check_scale(scale, D)
    out, lse = _outputs(q, out, lse)
    torch.ops.sparsevila.decode_attention(q, k, v, lengths, scale, out, lse)
    return out, lse


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """Write the new token in place: ``k_cache[b, :, lengths[b]] = k_new[b]`` (same for v); ``lengths += 1``.

    ``k_new, v_new`` are ``[B, Hk, D]``. The caller guarantees ``lengths[b] < capacity`` (``capacity`` was
    sized for the tokens to generate); it is checked on CPU tensors and under ``SPARSEVILA_DEBUG=1``.
    """
    B, Hk, D, cap = _check_cache(k_new, k_cache, v_cache, "k_new", "k_cache", "v_cache", same_heads=True)
    C.check_tensor("v_new", v_new, ndim=3)
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new must have the shape of k_new {tuple(k_new.shape)}; got {tuple(v_new.shape)}")
    C.check_same_dtype(k_new=k_new, v_new=v_new)
    C.check_same_device(k_new=k_new, v_new=v_new)
    _check_lengths("lengths", lengths, B, cap - 1, "k_new", k_new)
    torch.ops.sparsevila.append_kv(k_new, v_new, k_cache, v_cache, lengths)


def rope_append_kv(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A decode step's rotary embedding fused with its cache append; returns the rotated query.

    ``rope(x) = x cos + rotate_half(x) sin`` (``rotate_half(x) = [-x[D/2:], x[:D/2]]``, Llama / Qwen's) in fp32 with
    row b's ``cos[b], sin[b]``, rounded once to the output dtype: ``out = rope(q)``,
    ``k_cache[b, :, lengths[b]] = rope(k_new[b])``, ``v_cache[b, :, lengths[b]] = v_new[b]``, ``lengths += 1``.
    ``q [B, Hq, D]``, ``k_new, v_new [B, Hk, D]``, ``cos, sin [B, D]`` (any float dtype), caches ``[B, Hk, capacity,
    D]``, ``lengths`` int32 ``[B]`` with a free slot (``append_kv``'s rule), ``out [B, Hq, D]`` in q's dtype.
    """
    B, Hq, D, cap = _check_cache(q, k_cache, v_cache, "q", "k_cache", "v_cache")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        C.check_tensor(name, t, ndim=3)
        if tuple(t.shape) != (B, k_cache.shape[1], D):
            raise ValueError(f"{name} must be [B, Hk, D] = [{B}, {k_cache.shape[1]}, {D}]; got {tuple(t.shape)}")
    C.check_same_dtype(q=q, k_new=k_new, v_new=v_new)
    C.check_same_device(q=q, k_new=k_new, v_new=v_new, cos=cos, sin=sin)
    for name, t in (("cos", cos), ("sin", sin)):
        C.check_tensor(name, t, ndim=2)
        if tuple(t.shape) != (B, D):
            raise ValueError(f"{name} must be [B, D] = [{B}, {D}]; got {tuple(t.shape)}")
    if D % 2:
        raise ValueError(f"q's head dim must be even for rotate_half; got {D}")
    _check_lengths("lengths", lengths, B, cap - 1, "q", q)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    else:
        C.check_tensor("out", out, ndim=3)
        C.check_same_dtype(q=q, out=out)
        C.check_same_device(q=q, out=out)
        if tuple(out.shape) != (B, Hq, D):
            raise ValueError(f"out must be [B, Hq, D] = [{B}, {Hq}, {D}]; got {tuple(out.shape)}")
    torch.ops.sparsevila.rope_append_kv(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, out)
    return out


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor,
                            n_valid: torch.Tensor, *, scale: Optional[float] = None,
                            out: Optional[torch.Tensor] = None,
                            lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode over the full cache, gathering ``k_cache[b, g, indices[b, g, :n_valid_b]]`` inside the kernel.

    The comparison point for packing: same result as ``decode_attention`` over the packed rows.
    ``indices`` int32 ``[B, Hk, n]`` (positions into the cache), ``n_valid`` int32 ``[B]`` in ``[0, n]``.
    """
    B, Hq, D, T = _check_cache(q, k_cache, v_cache, "q", "k_cache", "v_cache")
    C.check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,))
    if tuple(indices.shape[:2]) != (B, k_cache.shape[1]):
        raise ValueError(f"indices must be int32 [B, Hk, n] = [{B}, {k_cache.shape[1]}, n]; got {tuple(indices.shape)}")
    C.check_same_device(q=q, indices=indices)
    _check_lengths("n_valid", n_valid, B, indices.shape[2], "q", q)
    if C.value_checks_enabled(indices):
        for b, n in enumerate(n_valid.tolist()):
            valid = indices[b, :, :n]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= T):
                raise ValueError(f"indices[{b}, :, :n_valid[{b}]] must lie in [0, {T}) (cache positions); got "
                                 f"range [{int(valid.min())}, {int(valid.max())}]")
    scale = C.check_scale(scale, D)
    out, lse = _outputs(q, out, lse)
    torch.ops.sparsevila.sparse_decode_attention(q, k_cache, v_cache, indices, n_valid, scale, out, lse)
    return out, lse
