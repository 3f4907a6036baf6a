"""Hypothesis property tests of the reference ops: random segment lists, spans, ties and lengths.

Bounded (``max_examples`` ~30, derandomized) so the file stays a few seconds on a 2-core CI machine. Tensors
come from a drawn seed, so every falsifying example is reproducible from the printed draw.
"""
from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsevila_ops as so

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
seeds = st.integers(0, 2**31 - 1)


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@SETTINGS
@given(lens=st.lists(st.integers(0, 24), min_size=1, max_size=5), H=st.integers(1, 3),
       D=st.sampled_from([8, 64, 72, 80]), num_summary=st.integers(0, 3), reduce_heads=st.booleans(),
       dtype=DTYPES, seed=seeds)
def test_salience_sums_to_one_per_segment(lens, H, D, num_summary, reduce_heads, dtype, seed):
    T = sum(lens)
    qk = _randn(seed, T, 2, H, D, dtype=dtype) * 2  # sharper softmax than unit logits
    with so.use_backend("reference"):
        out = so.visual_salience(qk[:, 0], qk[:, 1], _cu(lens), max(lens), num_summary=num_summary,
                                 reduce_heads=reduce_heads)
    assert out.shape == ((T,) if reduce_heads else (H, T))
    assert torch.all(out >= 0)
    start = 0
    for n in lens:
        if n:
            total = out[..., start:start + n].double().sum(-1)
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
        start += n


def _topk_oracle(row, vs: int, ve: int, keep: int):
    """Sort the span by (score descending, position ascending), keep the first, return them by position."""
    ranked = sorted(range(vs, ve), key=lambda j: (-row[j], j))[:min(keep, ve - vs)]
    return sorted(ranked) + [-1] * (keep - min(keep, ve - vs))


@st.composite
def select_problems(draw):
    L, B, Hk, T = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 30))
    spans = [sorted(draw(st.lists(st.integers(0, T), min_size=2, max_size=2))) for _ in range(B)]
    keep = draw(st.integers(0, T))
    levels = draw(st.integers(1, 4))  # few distinct values: heavy ties
    scores = draw(st.lists(st.integers(0, levels - 1), min_size=L * B * Hk * T, max_size=L * B * Hk * T))
    return torch.tensor(scores, dtype=torch.float32).view(L, B, Hk, T), spans, keep


@SETTINGS
@given(problem=select_problems())
def test_select_kv_equals_sort_oracle(problem):
    scores, spans, keep = problem
    vs, ve = [s for s, _ in spans], [e for _, e in spans]
    with so.use_backend("reference"):
        idx = so.select_kv(scores, vs, ve, keep)
    L, B, Hk, _ = scores.shape
    for l, b, g in itertools.product(range(L), range(B), range(Hk)):
        assert idx[l, b, g].tolist() == _topk_oracle(scores[l, b, g].tolist(), vs[b], ve[b], keep)


@SETTINGS
@given(B=st.integers(1, 3), Hk=st.integers(1, 2), G=st.sampled_from([1, 3, 4]), cap=st.integers(1, 40),
       D=st.sampled_from([16, 64, 80]), dtype=DTYPES, data=st.data(), seed=seeds)
def test_decode_over_random_prefix_is_softmax_attention(B, Hk, G, cap, D, dtype, data, seed):
    lengths = data.draw(st.lists(st.integers(0, cap), min_size=B, max_size=B), label="lengths")
    q = _randn(seed, B, Hk * G, D, dtype=dtype)
    kv = _randn(seed + 1, B, cap, 2, Hk, D, dtype=dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, Hk, cap, D], strided
    scale = D ** -0.5
    with so.use_backend("reference"):
        out, lse = so.decode_attention(q, k, v, torch.tensor(lengths, dtype=torch.int32))
    for b, h in itertools.product(range(B), range(Hk * G)):
        n = lengths[b]
        if n == 0:
            assert torch.all(out[b, h] == 0) and lse[b, h] == float("-inf")
            continue
        s = (k[b, h // G, :n].double() @ q[b, h].double()) * scale
        want = torch.softmax(s, dim=0) @ v[b, h // G, :n].double()
        torch.testing.assert_close(out[b, h].double(), want, rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-5)
        assert abs(float(lse[b, h]) - float(torch.logsumexp(s, 0))) < 1e-4


@SETTINGS
@given(segs=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 16)), min_size=1, max_size=4),
       Hk=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), causal=st.booleans(), data=st.data(), seed=seeds)
def test_prefill_relevance_sums_to_rows_that_see_a_key(segs, Hk, G, causal, data, seed):
    """Each relevance row's softmax sums to 1, so relevance of a segment sums to G x (rel rows that see a key)."""
    rel = [sorted(data.draw(st.lists(st.integers(0, m), min_size=2, max_size=2))) for m, _ in segs]
    ms, ns = [m for m, _ in segs], [n for _, n in segs]
    q = _randn(seed, sum(ms), Hk * G, 16)
    kv = _randn(seed + 1, sum(ns), 2, Hk, 16)
    with so.use_backend("reference"):
        _, lse, relevance = so.prefill_attention(q, kv[:, 0], kv[:, 1], _cu(ms), _cu(ns), max(ms), max(ns),
                                                 causal=causal, rel_rows=torch.tensor(rel, dtype=torch.int32))
    assert torch.all(relevance >= 0)
    start = 0
    for (m, n), (r0, r1) in zip(segs, rel):
        seen = sum(n > 0 and (not causal or i + n - m >= 0) for i in range(r0, r1))
        total = relevance[:, start:start + n].double().sum(-1)
        torch.testing.assert_close(total, torch.full_like(total, G * seen), rtol=1e-5, atol=1e-4)
        start += n
