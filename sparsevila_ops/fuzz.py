"""Seeded fuzzing of a backend against the reference.

``python -m sparsevila_ops fuzz --op OP --backend B --cases N --seed S [--device D] [--scale small|real]``

Case ``i`` draws its inputs from ``torch.Generator().manual_seed(S + i)``: awkward sizes (0, 1, 7, 97, 729,
1025, ...), strided layouts (views of a fused QKV tensor, transposed caches, int32 index tensors as columns of
wider tables), GQA groups, varlen segments, dtypes. The backend writes into NaN-poisoned outputs; the reference
into fresh ones. Each failure prints a one-line repro; the exit status is non-zero if any case failed. Bad
arguments (``--cases`` < 1, a device this machine lacks, a backend that cannot run the op there) are refused
before any case runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _backend, reference
from ._checks import device_flag_error
from .testing import REL_TOL, poison, rel_err

AWKWARD = (0, 1, 7, 97, 729, 1025, 5125)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Case:
    """Inputs of one op call: positional op arguments, the indices of the outputs among them, and of those the
    ones poisoned before the run (default all; an output updated in place, such as a cache, is not)."""

    def __init__(self, desc: str, args: list, outputs: List[int], poisoned: Optional[List[int]] = None):
        self.desc, self.args, self.outputs = desc, args, outputs
        self.poisoned = outputs if poisoned is None else poisoned


def _randn(shape, dtype, device, gen, strided: bool):
    """Random normal tensor; ``strided``: a view whose last dim is contiguous but whose other strides are not
    (a slice of a wider tensor, like one third of a fused QKV projection)."""
    if strided and len(shape) >= 2:
        wide = torch.randn(*shape[:-2], shape[-2] * 3, shape[-1], generator=gen).to(dtype).to(device)
        return wide.unflatten(-2, (3, shape[-2]))[..., 1, :, :]
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def _lengths(rng: random.Random, n: int, hi: int) -> List[int]:
    pool = [x for x in AWKWARD if x <= hi]
    return [rng.choice(pool) if rng.random() < 0.5 else rng.randint(0, hi) for _ in range(n)]


def _cu(lens: List[int], device) -> torch.Tensor:
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def _index_width(rng: random.Random) -> int:
    """Row width of the int32 table whose column 0 holds a case's index tensors (1: plain contiguous); drawn
    last in each generator, so a seed's other inputs are the same as before index layouts were fuzzed."""
    return rng.choice([1, 1, 2, 3])


def _column(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as column 0 of an int32 ``[..., width]`` table (zeros elsewhere): last-dim stride ``width``."""
    if width == 1:
        return t
    table = torch.zeros(*t.shape, width, dtype=t.dtype, device=t.device)
    table[..., 0] = t
    return table[..., 0]


def gen_visual_salience(rng, gen, dev, big):
    S = rng.randint(1, 4)
    lens = _lengths(rng, S, 1025 if big else 40)
    H, D = rng.choice([1, 2, 16] if big else [1, 2, 3]), rng.choice([16, 64, 72, 80, 128] if big else [16, 24, 72])
    dt, strided = rng.choice(DTYPES), rng.random() < 0.5
    T = sum(lens)
    q, k = _randn((T, H, D), dt, dev, gen, strided), _randn((T, H, D), dt, dev, gen, strided)
    cu, c, scale = _cu(lens, dev), rng.choice([0, 0, 1, 3]), D ** -0.5
    lse = reference.segment_lse(q, k, cu, scale) if rng.random() < 0.4 else None
    reduce = rng.random() < 0.5
    out = torch.empty((T,) if reduce else (H, T), dtype=torch.float32, device=dev)
    det = rng.random() < 0.5
    w = _index_width(rng)
    desc = (f"lens={lens} H={H} D={D} {dt} strided={strided} c={c} lse={lse is not None} reduce={reduce} det={det} "
            f"index_stride={w}")
    return Case(desc, [q, k, _column(cu, w), max(lens), scale, c, lse, det, out], [8])


def _prefill_inputs(rng, gen, dev, big):
    S = rng.randint(1, 3)
    causal = rng.random() < 0.7
    ms = _lengths(rng, S, 300 if big else 20)
    ns = [m + rng.choice([0, 0, rng.randint(0, 600 if big else 20)]) if rng.random() < 0.85 else
          rng.randint(0, m) for m in ms]
    Hk, G = rng.choice([1, 2, 4]), rng.choice([1, 4, 7])
    D = rng.choice([64, 80, 128] if big else [16, 32, 80])
    dt, strided = rng.choice(DTYPES), rng.random() < 0.5
    q = _randn((sum(ms), Hk * G, D), dt, dev, gen, strided)
    k = _randn((sum(ns), Hk, D), dt, dev, gen, strided)
    v = _randn((sum(ns), Hk, D), dt, dev, gen, strided)
    rows = []
    for m in ms:
        r0 = rng.randint(0, m)
        rows.append([r0, rng.randint(r0, m)])
    rr = torch.tensor(rows, dtype=torch.int32, device=dev).view(S, 2)
    w = _index_width(rng)
    desc = f"m={ms} n={ns} Hk={Hk} G={G} D={D} {dt} strided={strided} causal={causal} rel_rows={rows} index_stride={w}"
    return (q, k, v, _column(_cu(ms, dev), w), _column(_cu(ns, dev), w), max(ms), max(ns), D ** -0.5, causal,
            _column(rr, w), desc)


def gen_prefill_attention(rng, gen, dev, big):
    q, k, v, cq, ck, mq, mk, sc, causal, _, desc = _prefill_inputs(rng, gen, dev, big)
    out, lse = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(q.shape[1], q.shape[0], device=dev)
    return Case(desc, [q, k, v, cq, ck, mq, mk, sc, causal, out, lse], [9, 10])


def gen_prefill_attention_relevance(rng, gen, dev, big):
    q, k, v, cq, ck, mq, mk, sc, causal, rr, desc = _prefill_inputs(rng, gen, dev, big)
    out, lse = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(q.shape[1], q.shape[0], device=dev)
    rel = torch.empty(k.shape[1], k.shape[0], device=dev)
    return Case(desc, [q, k, v, cq, ck, mq, mk, sc, causal, rr, out, lse, rel], [10, 11, 12])


def gen_kv_relevance(rng, gen, dev, big):
    q, k, v, cq, ck, mq, mk, sc, causal, rr, desc = _prefill_inputs(rng, gen, dev, big)
    lse = torch.empty(q.shape[1], q.shape[0], device=dev)
    reference.prefill_attention(q, k, v, cq, ck, mq, mk, sc, causal, torch.empty_like(q), lse)
    rel = torch.empty(k.shape[1], k.shape[0], device=dev)
    return Case(desc, [q, k, lse, cq, ck, mq, mk, sc, causal, rr, rel], [10])


def _spans(rng, B, T):
    vs, ve, tl = [], [], []
    for _ in range(B):
        t = rng.choice([T, T, rng.randint(0, T)])
        if rng.random() < 0.75:  # a long visual span between a short prefix and suffix, as in a VLM prompt
            a = rng.randint(0, t // 4)
            b = rng.randint(max(a, 3 * t // 4), t)
        else:
            a = rng.randint(0, t)
            b = rng.randint(a, t)
        vs.append(a), ve.append(b), tl.append(t)
    return vs, ve, tl


def _scores(shape, rng, gen, dev):
    s = torch.randn(*shape, generator=gen)
    if rng.random() < 0.4:  # heavy ties
        s = (s * 2).round() / 2
    return s.to(dev)


def gen_select_kv(rng, gen, dev, big):
    L, B, Hk = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 4])
    T = rng.choice([1, 7, 97, 729, 1025, 5125]) if big else rng.randint(1, 60)
    vs, ve, _ = _spans(rng, B, T)
    keep = rng.randint(0, T)
    scores = _scores((L, B, Hk, T), rng, gen, dev)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    idx = torch.empty(L, B, Hk, keep, dtype=torch.int32, device=dev)
    return Case(f"L={L} B={B} Hk={Hk} T={T} spans={list(zip(vs, ve))} keep={keep}",
                [scores, i32(vs), i32(ve), keep, idx], [4])


def gen_pack_kv(rng, gen, dev, big):
    L, B, Hk = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 4])
    T = rng.choice([7, 97, 729, 1025]) if big else rng.randint(1, 40)
    D, dt = rng.choice([64, 80, 128] if big else [16, 80]), rng.choice(DTYPES)
    vs, ve, tl = _spans(rng, B, T)
    keep = rng.randint(0, T)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    idx = torch.empty(L, B, Hk, keep, dtype=torch.int32, device=dev)
    reference.select_kv(_scores((L, B, Hk, T), rng, gen, dev), i32(vs), i32(ve), keep, idx)
    stacked = rng.random() < 0.5
    if stacked:
        kk = _randn((L, B, Hk, T, D), dt, dev, gen, False)
        vv = _randn((L, B, Hk, T, D), dt, dev, gen, False)
        ks, vs_ = list(kk.unbind(0)), list(vv.unbind(0))
    else:  # per-layer HF-style caches, some transposed views [B, T, Hk, D] -> [B, Hk, T, D]
        ks = [_randn((B, T, Hk, D), dt, dev, gen, False).transpose(1, 2) for _ in range(L)]
        vs_ = [_randn((B, Hk, T, D), dt, dev, gen, True) for _ in range(L)]
    cap = max(vs[b] + min(keep, ve[b] - vs[b]) + tl[b] - ve[b] for b in range(B)) + rng.randint(1, 5)
    ko = torch.empty(L, B, Hk, cap, D, dtype=dt, device=dev)
    vo = torch.empty_like(ko)
    ln = torch.empty(B, dtype=torch.int32, device=dev)
    w = _index_width(rng)
    return Case(f"L={L} B={B} Hk={Hk} T={T} D={D} {dt} stacked={stacked} spans={list(zip(vs, ve, tl))} keep={keep} "
                f"index_stride={w}", [ks, vs_, _column(idx, w), i32(vs), i32(ve), i32(tl), ko, vo, ln], [6, 7, 8])


def _decode_inputs(rng, gen, dev, big):
    B, Hk, G = rng.randint(1, 3), rng.choice([1, 2, 4]), rng.choice([1, 4, 7])
    cap = rng.choice([1, 7, 97, 729, 1025, 5125, 32768]) if big else rng.randint(1, 70)
    D, dt = rng.choice([64, 80, 128] if big else [16, 80]), rng.choice(DTYPES)
    transposed = rng.random() < 0.5
    if transposed:  # [B, cap, Hk, D] storage viewed as [B, Hk, cap, D]
        k = _randn((B, cap, Hk, D), dt, dev, gen, False).transpose(1, 2)
        v = _randn((B, cap, Hk, D), dt, dev, gen, False).transpose(1, 2)
    else:
        k, v = _randn((B, Hk, cap, D), dt, dev, gen, False), _randn((B, Hk, cap, D), dt, dev, gen, False)
    q = _randn((B, Hk * G, D), dt, dev, gen, rng.random() < 0.5)
    lens = [rng.choice([0, 1, cap, rng.randint(0, cap)]) for _ in range(B)]
    desc = f"B={B} Hk={Hk} G={G} cap={cap} D={D} {dt} transposed={transposed} lengths={lens}"
    return q, k, v, lens, desc


def gen_decode_attention(rng, gen, dev, big):
    q, k, v, lens, desc = _decode_inputs(rng, gen, dev, big)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[0], q.shape[1], device=dev)
    w = _index_width(rng)
    lengths = _column(torch.tensor(lens, dtype=torch.int32, device=dev), w)
    return Case(desc + f" index_stride={w}", [q, k, v, lengths, q.shape[-1] ** -0.5, out, lse], [5, 6])


def gen_append_kv(rng, gen, dev, big):
    q, k, v, lens, desc = _decode_inputs(rng, gen, dev, big)
    cap = k.shape[2]
    lens = [min(n, cap - 1) for n in lens]
    B, Hk, _, D = k.shape
    kn, vn = _randn((B, Hk, D), k.dtype, dev, gen, False), _randn((B, Hk, D), k.dtype, dev, gen, True)
    w = _index_width(rng)
    lengths = _column(torch.tensor(lens, dtype=torch.int32, device=dev), w)  # written in place, in its table
    return Case(desc + f" index_stride={w}", [kn, vn, k.clone(), v.clone(), lengths], [2, 3, 4], poisoned=[])


def gen_rope_append_kv(rng, gen, dev, big):
    """``append_kv``'s caches and lengths, q of the decode inputs, cos / sin of random angles (rows of a wider
    table, in q's dtype or fp32)."""
    q, k, v, lens, desc = _decode_inputs(rng, gen, dev, big)
    cap = k.shape[2]
    lens = [min(n, cap - 1) for n in lens]
    B, Hk, _, D = k.shape
    kn, vn = _randn((B, Hk, D), k.dtype, dev, gen, rng.random() < 0.5), _randn((B, Hk, D), k.dtype, dev, gen, True)
    angle_dt = rng.choice([q.dtype, torch.float32])
    angles = 6.283 * torch.rand(B, 2 * D, generator=gen).to(dev)
    cos, sin = angles.cos().to(angle_dt)[:, :D], angles.sin().to(angle_dt)[:, :D]
    w = _index_width(rng)
    lengths = _column(torch.tensor(lens, dtype=torch.int32, device=dev), w)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return Case(desc + f" angles={angle_dt} index_stride={w}",
                [q, kn, vn, cos, sin, k.clone(), v.clone(), lengths, out], [5, 6, 7, 8], poisoned=[8])


def gen_sparse_decode_attention(rng, gen, dev, big):
    q, k, v, lens, desc = _decode_inputs(rng, gen, dev, big)
    B, Hk, T, _ = k.shape
    n = rng.randint(0, T)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=gen)[:n].sort().values for _ in range(Hk)])
                       for _ in range(B)]).to(torch.int32).to(dev)
    nv = [rng.randint(0, n) for _ in range(B)]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, q.shape[1], device=dev)
    w = _index_width(rng)
    if w > 1:  # indices: a slice of wider rows (their last dim must stay contiguous)
        idx = torch.cat([idx] * w, dim=-1)[..., :n]
    n_valid = _column(torch.tensor(nv, dtype=torch.int32, device=dev), w)
    return Case(desc + f" n={n} n_valid={nv} index_stride={w}",
                [q, k, v, idx, n_valid, q.shape[-1] ** -0.5, out, lse], [6, 7])


def gen_gemv(rng, gen, dev, big):
    """1-8 rows of x (a view with 0, 4 or 8 leading columns cut: rows 16-byte aligned or not), N and K awkward
    (K not always a multiple of 8: the cuda kernel's fallback), glu half the time, weight strided a third of the
    time, bias, the RMSNorm fold and the residual fold each half the time; fp16/bf16 (the op's dtypes)."""
    dt = rng.choice([torch.float16, torch.bfloat16])
    M = rng.randint(1, 8)
    N = rng.choice([1, 7, 97, 729, 1025] + ([4608, 5125] if big else []))
    K = rng.choice([8, 16, 97, 136, 1000] + ([3584, 4104] if big else []))
    glu = rng.random() < 0.5
    rows = 2 * N if glu else N
    pad = rng.choice([0, 4, 8])
    x = torch.randn(M, K + pad, generator=gen).to(dt).to(dev)[:, pad:]
    w_pad = 8 if rng.random() < 1 / 3 else 0
    w = (0.05 * torch.randn(rows, K + w_pad, generator=gen)).to(dt).to(dev)[:, :K]
    bias = torch.randn(rows, generator=gen).to(dt).to(dev) if rng.random() < 0.5 else None
    norm = (1 + 0.2 * torch.randn(K, generator=gen)).to(dt).to(dev) if rng.random() < 0.5 else None
    eps = rng.choice([1e-6, 1e-5])
    residual = torch.randn(M, N, generator=gen).to(dt).to(dev) if rng.random() < 0.5 else None
    out = torch.empty(M, N, dtype=dt, device=dev)
    desc = (f"M={M} N={N} K={K} {dt} glu={glu} x_offset={pad} w_stride={K + w_pad} bias={bias is not None} "
            f"norm={norm is not None} residual={residual is not None}")
    return Case(desc, [x, w, bias, glu, norm, eps, residual, out], [7])


def gen_w4a16_linear(rng, gen, dev, big):
    """The ``[quant]`` extra's op: 1-16 rows of x (0, 4 or 8 leading columns cut: rows 16-byte aligned or not, the
    cuda kernel's fallback), N a multiple of 8 mostly (else the Triton kernel), K a multiple of a group of 128, 256 or
    640, glu half the time, bias half the time; every nibble and zero point drawn uniformly (random words, zeros
    0-15), scales 0.002-0.02; fp16/bf16."""
    dt = rng.choice([torch.float16, torch.bfloat16])
    M = rng.choice([1, 1, 2, 3, 8, rng.randint(1, 16)])
    N = rng.choice([8, 24, 40, 1032, 12, 100] + ([4608, 3584] if big else []))
    group = rng.choice([128, 128, 256, 640])
    K = group * rng.randint(1, (3584 if big else 1280) // group)
    glu = rng.random() < 0.5
    rows = 2 * N if glu else N
    pad = rng.choice([0, 4, 8])
    x = torch.randn(M, K + pad, generator=gen).to(dt).to(dev)[:, pad:]
    qweight = torch.randint(-2 ** 31, 2 ** 31, (rows, K // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (0.002 + 0.018 * torch.rand(K // group, rows, generator=gen)).to(dt)
    zeros = torch.randint(0, 16, (K // group, rows), generator=gen, dtype=torch.uint8)
    bias = torch.randn(rows, generator=gen).to(dt).to(dev) if rng.random() < 0.5 else None
    out = torch.empty(M, N, dtype=dt, device=dev)
    desc = f"M={M} N={N} K={K} group={group} {dt} glu={glu} x_offset={pad} bias={bias is not None}"
    return Case(desc, [x, qweight.to(dev), scales.to(dev), zeros.to(dev), bias, glu, out], [6])


GENERATORS: Dict[str, Callable] = {name[4:]: fn for name, fn in globals().items() if name.startswith("gen_")}
# ops outside torch.ops.sparsevila: (module that registers them, namespace); imported only when fuzzed
EXTRA_OPS = {"w4a16_linear": ("sparsevila_ops.quant", "sparsevila_quant")}


def _op(name: str):
    """The torch op ``name`` (an extra's module is imported first: it registers the op and its backends)."""
    module, namespace = EXTRA_OPS.get(name, (None, "sparsevila"))
    if module is not None:
        importlib.import_module(module)
    return getattr(getattr(torch.ops, namespace), name)


def _tol(case: Case) -> float:
    dts = [a.dtype for a in case.args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    # Outputs in fp32 computed from low-precision inputs are exact up to accumulation order; allow the
    # low-precision tolerance for the attention outputs written in that dtype.
    return max(REL_TOL.get(dt, 2e-3) for dt in dts) if dts else 0.0


def _clone(t: torch.Tensor) -> torch.Tensor:
    """A copy with ``t``'s strides (``clone`` makes a non-dense view contiguous, hiding the layout under test);
    the elements between them are 0."""
    size = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return torch.zeros(size, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride()).copy_(t)


def _clone_args(args):
    return [[_clone(t) for t in a] if isinstance(a, list) else _clone(a) if isinstance(a, torch.Tensor) else a
            for a in args]


def run_case(op: str, backend: str, seed: int, device: torch.device, big: bool) -> Tuple[bool, str]:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    case = GENERATORS[op](rng, gen, device, big)
    ref_args = _clone_args(case.args)
    with _backend.use_backend("reference"):
        _op(op)(*ref_args)
    test_args = _clone_args(case.args)
    for i in case.poisoned:
        poison(test_args[i])
    with _backend.use_backend(backend):
        _op(op)(*test_args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tol = _tol(case)
    worst = []
    for i in case.outputs:
        got, want = test_args[i], ref_args[i]
        if op == "pack_kv" and i in (6, 7):  # compare only the packed prefix of each row
            n = ref_args[8].long().cpu()
            mask = (torch.arange(got.shape[3]).view(1, 1, 1, -1) < n.view(1, -1, 1, 1))
            got, want = got.cpu()[mask.expand(got.shape[:4])], want.cpu()[mask.expand(want.shape[:4])]
        exact = not want.is_floating_point() or op in ("pack_kv", "append_kv", "select_kv") or (
            op == "rope_append_kv" and i == 6)  # v is copied
        err = 0.0 if exact and torch.equal(got.cpu(), want.cpu()) else (float("inf") if exact else rel_err(got, want))
        worst.append(err)
        if not err <= tol:
            return False, f"{case.desc}: output #{i} rel err {err:.3e} > {tol:.1e}"
    return True, f"{case.desc}: max rel err {max(worst) if worst else 0:.2e}"


def _device(p: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a torch device this machine has (cpu, or cuda[:N] with CUDA present); else a usage error."""
    err = device_flag_error("--device", name)
    if err is not None:
        p.error(err)
    return torch.device(name)


PROGRESS_EVERY = 25  # cases between progress lines (real-size cases are bound by Triton JIT compiles)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsevila_ops fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", required=True, choices=sorted(GENERATORS) + ["all"])
    p.add_argument("--backend", default="triton", choices=_backend.BACKENDS)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", choices=["small", "real"], default=None,
                   help="input sizes (default: real on CUDA, small on CPU where Triton is interpreted)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.cases < 1:
        p.error(f"--cases must be >= 1; got {a.cases}")
    device = _device(p, a.device)
    if a.backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # before the lazily imported kernels are loaded
    big = (a.scale or ("real" if device.type == "cuda" else "small")) == "real"
    ops = sorted(GENERATORS) if a.op == "all" else [a.op]
    for op in ops:
        try:
            _op(op)  # an extra's op registers its backends on import
            _backend.implementation(op, a.backend, device)
        except RuntimeError as e:
            p.error(f"--backend {a.backend}: {e}")
    failures = 0
    for op in ops:
        n_fail = 0
        t0 = time.monotonic()
        for i in range(a.cases):
            seed = a.seed + i
            try:
                ok, msg = run_case(op, a.backend, seed, device, big)
            except Exception as e:  # noqa: BLE001 - a crash is a failure with a repro
                ok, msg = False, f"raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            if not ok:
                n_fail += 1
                print(f"FAIL {op} seed={seed}: {msg}\n  repro: python -m sparsevila_ops fuzz --op {op} "
                      f"--backend {a.backend} --cases 1 --seed {seed} --device {a.device}"
                      + (f" --scale {a.scale}" if a.scale else ""), flush=True)
            elif a.verbose:
                print(f"ok   {op} seed={seed}: {msg}", flush=True)
            if (i + 1) % PROGRESS_EVERY == 0 and i + 1 < a.cases:  # partial results survive a time cap
                print(f"{op}: {i + 1}/{a.cases} run, {n_fail} failed, {time.monotonic() - t0:.0f} s", flush=True)
        print(f"{op}: {a.cases - n_fail} passed, {n_fail} failed ({a.backend} vs reference on {a.device}, "
              f"seeds {a.seed}..{a.seed + a.cases - 1})", flush=True)
        failures += n_fail
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
