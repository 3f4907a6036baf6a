"""``torch.compile(fullgraph=True)`` of every public op on the CPU (reference backend), compared with eager.

``aot_eager`` runs Dynamo, the fake implementations and functionalization of the out-variant ops without
Inductor's codegen, so these stay fast. Host-side value checks (``cu_seqlens``, ``rel_rows``, ``lengths``)
must step aside while tracing: a data-dependent guard there breaks the graph.
"""
from typing import Callable, Dict, Tuple

import pytest
import torch

import sparsevila_ops as so

I32 = torch.int32


def _gen():
    return torch.Generator().manual_seed(0)


def _salience():
    g = _gen()
    q, k = torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    cu = torch.tensor([0, 4, 10], dtype=I32)
    return (lambda q, k, cu: so.visual_salience(q, k, cu, 6, num_summary=1, reduce_heads=False)), (q, k, cu)


def _salience_batched():
    g = _gen()
    q, k = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    return (lambda q, k: so.visual_salience(q, k)), (q, k)


def _varlen():
    g = _gen()
    q = torch.randn(7, 4, 8, generator=g)
    k, v = torch.randn(12, 2, 8, generator=g), torch.randn(12, 2, 8, generator=g)
    cq, ck = torch.tensor([0, 3, 7], dtype=I32), torch.tensor([0, 5, 12], dtype=I32)
    rows = torch.tensor([[1, 3], [0, 4]], dtype=I32)
    return q, k, v, cq, ck, rows


def _prefill():
    q, k, v, cq, ck, _ = _varlen()
    return (lambda q, k, v, cq, ck: so.prefill_attention(q, k, v, cq, ck, 4, 7)), (q, k, v, cq, ck)


def _prefill_relevance():
    q, k, v, cq, ck, rows = _varlen()
    return (lambda q, k, v, cq, ck, rows: so.prefill_attention(q, k, v, cq, ck, 4, 7, rel_rows=rows),
            (q, k, v, cq, ck, rows))


def _kv_relevance():
    q, k, v, cq, ck, rows = _varlen()
    _, lse = so.prefill_attention(q, k, v, cq, ck, 4, 7)
    return (lambda q, k, lse, cq, ck, rows: so.kv_relevance(q, k, lse, cq, ck, 4, 7, rows),
            (q, k, lse, cq, ck, rows))


def _cache():
    g = _gen()
    scores = torch.rand(3, 2, 2, 20, generator=g)  # [L, B, Hk, T]
    k, v = torch.randn(3, 2, 2, 20, 8, generator=g), torch.randn(3, 2, 2, 20, 8, generator=g)
    return scores, k, v


def _select():
    scores, _, _ = _cache()
    return (lambda s: so.select_kv(s, [3, 2], 15, 4)), (scores,)


def _pack():
    scores, k, v = _cache()
    idx = so.select_kv(scores, [3, 2], 15, 4)
    # Zeroed outputs: slots past lengths[b] are left as they were, so both runs must start from the same.
    k_out, v_out = torch.zeros(3, 2, 2, 32, 8), torch.zeros(3, 2, 2, 32, 8)
    return (lambda k, v, idx, ko, vo: so.pack_kv(list(k.unbind(0)), list(v.unbind(0)), idx, [3, 2], 15, 32,
                                                 [20, 18], k_out=ko, v_out=vo)), (k, v, idx, k_out, v_out)


def _select_pack():
    scores, k, v = _cache()

    def fn(s, k, v):  # packed rows hold 3 + 4 + (20 - 15) = 12 tokens; the slots after them are uninitialized
        kp, vp, lengths, idx = so.select_pack_kv(s, k, v, 3, 15, 4, 32)
        return kp[..., :12, :], vp[..., :12, :], lengths, idx
    return fn, (scores, k, v)


def _prune():
    # Output sizes depend only on the host-side seg_lens and keep_ratio (keep_s = max(1, round(r * n_s)) per
    # segment), never on salience values, so the graph is static and fullgraph holds.
    sal = torch.rand(20, generator=_gen())
    return (lambda s: so.prune_visual_tokens(s, [8, 0, 12], 0.5, group=4)), (sal,)


def _decode_inputs():
    g = _gen()
    q = torch.randn(2, 4, 8, generator=g)
    k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    return q, k, v, torch.tensor([5, 0], dtype=I32)


def _decode():
    q, k, v, lengths = _decode_inputs()
    return (lambda q, k, v, n: so.decode_attention(q, k, v, n)), (q, k, v, lengths)


def _append():
    _, k, v, lengths = _decode_inputs()
    g = _gen()
    kn, vn = torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g)

    def step(kn, vn, k, v, n):  # append mutates its inputs: return them so both runs can be compared
        so.append_kv(kn, vn, k, v, n)
        return k, v, n
    return step, (kn, vn, k, v, lengths)


def _rope_append():
    q, k, v, lengths = _decode_inputs()
    g = _gen()
    kn, vn, cs = torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g), torch.randn(2, 8, generator=g)

    def step(q, kn, vn, c, s, k, v, n):  # mutates the caches and lengths: return them so both runs can be compared
        return so.rope_append_kv(q, kn, vn, c, s, k, v, n), k, v, n
    return step, (q, kn, vn, cs.cos(), cs.sin(), k, v, lengths)


def _sparse_decode():
    q, k, v, _ = _decode_inputs()
    idx = torch.tensor([[[0, 3, 7], [2, 9, 15]], [[1, 4, 5], [6, 8, 10]]], dtype=I32)
    n_valid = torch.tensor([3, 1], dtype=I32)
    return (lambda q, k, v, i, n: so.sparse_decode_attention(q, k, v, i, n)), (q, k, v, idx, n_valid)


def _gemv():
    g = _gen()
    x = torch.randn(2, 12, generator=g).to(torch.bfloat16)
    w, b = torch.randn(10, 12, generator=g).to(torch.bfloat16), torch.randn(10, generator=g).to(torch.bfloat16)
    n = torch.randn(12, generator=g).to(torch.bfloat16)
    return (lambda x, w, b, n: (so.gemv(x, w, b, glu=True), so.gemv(x, w),
                                so.gemv(x[:1], w, b, norm_weight=n, eps=1e-5, residual=x[:1, :10]))), (x, w, b, n)


CASES: Dict[str, Callable[[], Tuple[Callable, tuple]]] = {
    "visual_salience": _salience, "visual_salience_batched": _salience_batched, "prefill_attention": _prefill,
    "prefill_attention_rel_rows": _prefill_relevance, "kv_relevance": _kv_relevance, "select_kv": _select,
    "pack_kv": _pack, "select_pack_kv": _select_pack, "prune_visual_tokens": _prune,
    "decode_attention": _decode, "append_kv": _append, "rope_append_kv": _rope_append,
    "sparse_decode_attention": _sparse_decode, "gemv": _gemv,
}


def _flat(x):
    return [t for y in x for t in _flat(y)] if isinstance(x, (tuple, list)) else [x]


def test_every_public_op_has_a_case():
    ops = {n for n in so.__all__ if n not in ("available_backends", "use_backend")}
    assert ops <= {n.replace("_batched", "").replace("_rel_rows", "") for n in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    fn, args = CASES[name]()
    expected = _flat(fn(*args))
    _, args = CASES[name]()  # fresh inputs: some ops write into theirs
    got = _flat(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}[{i}]: {m}")


def test_select_pack_kv_recompiles_for_new_host_spans():
    """Spans are Python ints or lists: the compiled function guards on them (or traces them as symbols) and
    stays equal to eager when they change."""
    torch._dynamo.reset()
    scores, k, v = _cache()
    fn = torch.compile(lambda s, k, v, vs, ve: so.select_pack_kv(s, k, v, vs, ve, 4, 32), fullgraph=True,
                       backend="aot_eager")
    for vs, ve in ((3, 15), (2, 14), ([4, 1], [15, 12]), (0, 20)):
        kp, vp, lengths, idx = fn(scores, k, v, vs, ve)
        ekp, evp, elengths, eidx = so.select_pack_kv(scores, k, v, vs, ve, 4, 32)
        assert torch.equal(idx, eidx) and torch.equal(lengths, elengths), (vs, ve)
        for b, n in enumerate(lengths.tolist()):  # slots past lengths[b] are uninitialized
            assert torch.equal(kp[:, b, :, :n], ekp[:, b, :, :n]) and torch.equal(vp[:, b, :, :n], evp[:, b, :, :n])
