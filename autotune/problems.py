"""What the tuner needs to drive each op: its arguments for a shape, which of them the launcher writes, and the
reference that says what those must hold.

A shape is a dict of sizes; the op's ``defaults`` fill the fields it leaves out (``dtype`` is a torch dtype
name). :func:`make_args` builds the launcher's arguments for it: inputs random from a seeded generator, outputs
zero. References are ``sparsevila_ops.reference`` (the torch oracle), with the launcher's signature; that of
``w4a16_linear`` dequantizes the 4-bit weight (``sparsevila_ops.quant``) and multiplies in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from sparsevila_ops import reference

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Problem:
    outputs: Tuple[int, ...]  # positions of the arguments the launcher writes (restored before every trial)
    reference: Callable[..., None]  # writes what those must hold; same arguments as the launcher
    make: Callable[[dict, torch.device, torch.Generator], tuple]
    defaults: dict


def _randn(gen, device, dtype, *shape):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _dtype(s: dict) -> torch.dtype:
    return getattr(torch, s["dtype"])


# --- visual_salience: the LSE pass (its own arguments) and the column-sum pass (the op's, lse given) -----------

def _salience_qk(s, device, gen):
    T = s["segs"] * s["n"]
    q, k = (_randn(gen, device, _dtype(s), T, s["H"], s["D"]) for _ in range(2))
    return q, k, torch.arange(0, T + 1, s["n"], dtype=torch.int32, device=device)


def _make_lse(s, device, gen):
    q, k, cu = _salience_qk(s, device, gen)
    return q, k, cu, s["n"], s["D"] ** -0.5, s["summary"], torch.zeros(s["H"], q.shape[0], device=device)


def _lse_reference(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse2):
    """The LSE pass: log2-domain row LSE over the segment's keys, for the rows R of each segment only."""
    full = reference.segment_lse(q, k, cu_seqlens, scale) * LOG2E
    if num_summary == 0:
        lse2.copy_(full)
        return
    c = cu_seqlens.tolist()
    for a, b in zip(c[:-1], c[1:]):
        r_end = a + min(num_summary, b - a)
        lse2[:, a:r_end] = full[:, a:r_end]


def _make_colsum(s, device, gen):
    q, k, cu = _salience_qk(s, device, gen)
    lse = reference.segment_lse(q, k, cu, s["D"] ** -0.5)
    out = torch.zeros(q.shape[0], device=device) if s["reduce"] else torch.zeros(s["H"], q.shape[0], device=device)
    return q, k, cu, s["n"], s["D"] ** -0.5, s["summary"], lse, False, s["deterministic"], out


def _colsum_reference(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, lse_log2, deterministic, out):
    reference.visual_salience(q, k, cu_seqlens, max_seqlen, scale, num_summary,
                              lse * math.log(2) if lse_log2 else lse, deterministic, out)


def _make_salience(s, device, gen):
    """The whole op (the cuda backend's launcher): both passes, or the column sums when ``lse_given``."""
    q, k, cu = _salience_qk(s, device, gen)
    lse = reference.segment_lse(q, k, cu, s["D"] ** -0.5) if s["lse_given"] else None
    out = torch.zeros(q.shape[0], device=device) if s["reduce"] else torch.zeros(s["H"], q.shape[0], device=device)
    return q, k, cu, s["n"], s["D"] ** -0.5, s["summary"], lse, False, out


# --- prefill_attention and kv_relevance ---------------------------------------------------------------------

def _make_prefill(s, device, gen):
    T, dt = s["segs"] * s["n"], _dtype(s)
    q = _randn(gen, device, dt, T, s["Hq"], s["D"])
    k, v = (_randn(gen, device, dt, T, s["Hk"], s["D"]) for _ in range(2))
    cu = torch.arange(0, T + 1, s["n"], dtype=torch.int32, device=device)
    return (q, k, v, cu, cu, s["n"], s["n"], s["D"] ** -0.5, s["causal"], torch.zeros_like(q),
            torch.zeros(s["Hq"], T, device=device))


def _make_relevance(s, device, gen):
    """The last ``rows`` query rows of one segment of ``n`` keys (right-aligned), with their LSE."""
    M, N, dt, scale = s["rows"], s["n"], _dtype(s), s["D"] ** -0.5
    q = _randn(gen, device, dt, M, s["Hq"], s["D"])
    k = _randn(gen, device, dt, N, s["Hk"], s["D"])
    cu_q, cu_k = _i32([0, M], device), _i32([0, N], device)
    lse = torch.empty(s["Hq"], M, device=device)
    reference.prefill_attention(q, k, k, cu_q, cu_k, M, N, scale, s["causal"], torch.empty_like(q), lse)
    return (q, k, lse, cu_q, cu_k, M, N, scale, s["causal"], _i32([[0, M]], device),
            torch.zeros(s["Hk"], N, device=device))


# --- select_kv and pack_kv: a visual span of n tokens between a prefix and a suffix ------------------------------

def _span(s):
    keep = max(1, round(s["keep"] * s["n"]))
    return s["prefix"], s["prefix"] + s["n"], s["prefix"] + s["n"] + s["suffix"], keep


def _make_select(s, device, gen):
    vs, ve, T, keep = _span(s)
    scores = torch.rand(s["L"], s["B"], s["Hk"], T, generator=gen, device=device)
    return (scores, _i32([vs] * s["B"], device), _i32([ve] * s["B"], device), keep,
            torch.zeros(s["L"], s["B"], s["Hk"], keep, dtype=torch.int32, device=device))


def _make_pack(s, device, gen):
    """Layers as views of one stacked cache (the uniform-stride path), ``keep`` sorted positions per row."""
    vs, ve, T, keep = _span(s)
    L, B, Hk, D, dt = s["L"], s["B"], s["Hk"], s["D"], _dtype(s)
    k, v = (_randn(gen, device, dt, L, B, Hk, T, D) for _ in range(2))
    picks = torch.rand(L, B, Hk, s["n"], generator=gen, device=device).topk(keep, dim=-1).indices
    indices = (picks.sort(dim=-1).values + vs).to(torch.int32)
    cap = T - s["n"] + keep + s["slack"]
    return (list(k.unbind(0)), list(v.unbind(0)), indices, _i32([vs] * B, device), _i32([ve] * B, device),
            _i32([T] * B, device), torch.zeros(L, B, Hk, cap, D, dtype=dt, device=device),
            torch.zeros(L, B, Hk, cap, D, dtype=dt, device=device), torch.zeros(B, dtype=torch.int32, device=device))


# --- decode_attention, sparse_decode_attention, append_kv ---------------------------------------------------------

def _make_decode(s, device, gen):
    dt, cap = _dtype(s), s["n"] + s["slack"]
    q = _randn(gen, device, dt, s["B"], s["Hq"], s["D"])
    k, v = (_randn(gen, device, dt, s["B"], s["Hk"], cap, s["D"]) for _ in range(2))
    return (q, k, v, _i32([s["n"]] * s["B"], device), s["D"] ** -0.5, torch.zeros_like(q),
            torch.zeros(s["B"], s["Hq"], device=device))


def _make_sparse_decode(s, device, gen):
    """``n`` sorted positions per (b, KV head) out of a cache of ``T``."""
    dt = _dtype(s)
    q = _randn(gen, device, dt, s["B"], s["Hq"], s["D"])
    k, v = (_randn(gen, device, dt, s["B"], s["Hk"], s["T"], s["D"]) for _ in range(2))
    picks = torch.rand(s["B"], s["Hk"], s["T"], generator=gen, device=device).topk(s["n"], dim=-1).indices
    return (q, k, v, picks.sort(dim=-1).values.to(torch.int32), _i32([s["n"]] * s["B"], device), s["D"] ** -0.5,
            torch.zeros_like(q), torch.zeros(s["B"], s["Hq"], device=device))


def _make_append(s, device, gen):
    """Caches half full, so repeated timed calls keep finding a free slot."""
    dt = _dtype(s)
    k_new, v_new = (_randn(gen, device, dt, s["B"], s["Hk"], s["D"]) for _ in range(2))
    k_cache, v_cache = (torch.zeros(s["B"], s["Hk"], s["cap"], s["D"], dtype=dt, device=device) for _ in range(2))
    return k_new, v_new, k_cache, v_cache, _i32([s["cap"] // 2] * s["B"], device)


def _make_rope_append(s, device, gen):
    """q, the new k / v, cos / sin of angles in [0, 2 pi) for one position per row, caches half full (repeated
    timed calls keep finding a free slot), q_out zero."""
    dt = _dtype(s)
    q = _randn(gen, device, dt, s["B"], s["Hq"], s["D"])
    k_new, v_new = (_randn(gen, device, dt, s["B"], s["Hk"], s["D"]) for _ in range(2))
    angle = 6.283 * torch.rand(s["B"], s["D"], generator=gen, device=device)
    k_cache, v_cache = (torch.zeros(s["B"], s["Hk"], s["cap"], s["D"], dtype=dt, device=device) for _ in range(2))
    return (q, k_new, v_new, angle.cos().to(dt), angle.sin().to(dt), k_cache, v_cache,
            _i32([s["cap"] // 2] * s["B"], device), torch.zeros_like(q))


# --- w4a16_linear (sparsevila_quant, the [quant] extra: imported only when its problem is built) -------------------

def _make_w4(s, device, gen):
    """x [M, K] and a random 4-bit weight [N, K] (glu: [2N, K]; every nibble and zero in [0, 15], scales in
    [0.002, 0.008) as from quantizing weights of std ~0.02), bias with ``bias``; out zero [M, N]."""
    from sparsevila_ops import quant
    M, N, K, G, dt = s["M"], s["N"], s["K"], s["group"], _dtype(s)
    rows = 2 * N if s["glu"] else N
    if G < quant.PACK_K or G % quant.PACK_K or K % G:
        raise ValueError(f"w4a16_linear: group must be a multiple of {quant.PACK_K} dividing K; got group {G}, K {K}")
    w4 = quant.W4Weight(  # checks the layout
        torch.randint(-2 ** 31, 2 ** 31, (rows, K // 8), generator=gen, device=device, dtype=torch.int32),
        (0.002 + 0.006 * torch.rand(K // G, rows, generator=gen, device=device)).to(dt),
        torch.randint(0, 16, (K // G, rows), generator=gen, device=device, dtype=torch.uint8), G)
    bias = (0.1 * _randn(gen, device, torch.float32, rows)).to(dt) if s["bias"] else None
    return (_randn(gen, device, dt, M, K), w4.qweight, w4.scales, w4.zeros, bias, bool(s["glu"]),
            torch.zeros(M, N, dtype=dt, device=device))


def _w4_reference(x, qweight, scales, zeros, bias, glu, out):
    """The op's reference backend: dequantize to fp32 (exact), fp32 matmul, + bias (glu: then the rounded
    ``silu(gate) * up``)."""
    from sparsevila_ops import quant
    quant._reference_w4a16_linear(x, qweight, scales, zeros, bias, glu, out)


# --- gemv ----------------------------------------------------------------------------------------------------------

def _gemv_reference(x, weight, bias, glu, out):
    """The op's reference backend on the kernels' arguments (no folds: a folded launch uses its plain kernel's
    config)."""
    reference.gemv(x, weight, bias, glu, None, 0.0, None, out)


def _make_gemv(s, device, gen):
    """x [M, K], weight [N, K] (glu: [2N, K]) * 0.05 (std ~0.05 as a trained layer's), bias with ``bias``; out
    zero [M, N]."""
    M, N, K, dt = s["M"], s["N"], s["K"], _dtype(s)
    rows = 2 * N if s["glu"] else N
    bias = (0.1 * _randn(gen, device, torch.float32, rows)).to(dt) if s["bias"] else None
    return (_randn(gen, device, dt, M, K), (0.05 * _randn(gen, device, torch.float32, rows, K)).to(dt), bias,
            bool(s["glu"]), torch.zeros(M, N, dtype=dt, device=device))


_LLM = {"dtype": "bfloat16", "Hq": 28, "Hk": 4, "D": 128}  # Qwen2-7B (and the LLM of Qwen2.5-VL-7B)
_VISION = {"dtype": "bfloat16", "H": 16, "D": 80, "segs": 1, "n": 4096, "summary": 0}  # Qwen2.5-VL vision
_SPAN = {"L": 28, "B": 1, "Hk": 4, "n": 8192, "keep": 0.05, "prefix": 64, "suffix": 64}

PROBLEMS: Dict[str, Problem] = {
    "visual_salience.lse": Problem((6,), _lse_reference, _make_lse, _VISION),
    "visual_salience.colsum": Problem((9,), _colsum_reference, _make_colsum,
                                      {**_VISION, "reduce": True, "deterministic": False}),
    "visual_salience": Problem((8,), reference.visual_salience, _make_salience,
                               {**_VISION, "reduce": True, "lse_given": False}),
    "prefill_attention": Problem((9, 10), reference.prefill_attention, _make_prefill,
                                 {**_LLM, "n": 8192, "segs": 1, "causal": True}),
    "kv_relevance": Problem((10,), reference.kv_relevance, _make_relevance,
                            {**_LLM, "rows": 256, "n": 8192, "causal": True}),
    "select_kv": Problem((4,), reference.select_kv, _make_select, _SPAN),
    "pack_kv": Problem((6, 7, 8), reference.pack_kv, _make_pack,
                       {**_SPAN, "dtype": "bfloat16", "D": 128, "slack": 256}),
    "decode_attention": Problem((5, 6), reference.decode_attention, _make_decode,
                                {**_LLM, "B": 1, "n": 8192, "slack": 256}),
    "sparse_decode_attention": Problem((6, 7), reference.sparse_decode_attention, _make_sparse_decode,
                                       {**_LLM, "B": 1, "T": 32768, "n": 1638}),
    "append_kv": Problem((2, 3, 4), reference.append_kv, _make_append,
                         {"dtype": "bfloat16", "B": 1, "Hk": 4, "D": 128, "cap": 8192}),
    "rope_append_kv": Problem((5, 6, 7, 8), reference.rope_append_kv, _make_rope_append,
                              {"dtype": "bfloat16", "B": 1, "Hq": 28, "Hk": 4, "D": 128, "cap": 8192}),
    "gemv": Problem((4,), _gemv_reference, _make_gemv,  # Qwen2.5-7B's fused qkv at batch 1
                    {"dtype": "bfloat16", "M": 1, "N": 4608, "K": 3584, "glu": False, "bias": False}),
    "w4a16_linear": Problem((6,), _w4_reference, _make_w4,  # Qwen2.5-7B's qkv at batch 1
                            {"dtype": "bfloat16", "M": 1, "N": 4608, "K": 3584, "group": 128, "glu": False,
                             "bias": False}),
}


def problem_of(op: str) -> Problem:
    if op not in PROBLEMS:
        raise ValueError(f"op must be one of {sorted(PROBLEMS)}; got {op!r}")
    return PROBLEMS[op]


def full_shape(op: str, shape: dict) -> dict:
    """``shape`` with the op's defaults for the fields it leaves out; unknown fields raise ValueError."""
    defaults = problem_of(op).defaults
    unknown = set(shape) - set(defaults) - {"op"}
    if unknown:
        raise ValueError(f"unknown {op} shape fields {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in shape.items() if k != "op"}}


def make_args(op: str, shape: dict, device, seed: int = 0) -> tuple:
    """The launcher's arguments of ``op`` for ``shape`` on ``device``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return problem_of(op).make(full_shape(op, shape), device, gen)
