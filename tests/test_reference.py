"""The torch references (``reference`` backend, through the public functions) against the float64 brute force
of ``tests/brute.py``, plus the invariants every op must keep.

The reference and the brute force read the same low-precision input values; they differ only by fp32
arithmetic and, for outputs in the input dtype, by the final rounding: ``ROUND_TOL`` bounds exactly that.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import brute
import sparsevila_ops as so
from helpers import assert_rel, poison
from sparsevila_ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative L2 error of an output stored in the input dtype (fp32 math + one final rounding) vs float64.
ROUND_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
F32_TOL = 1e-5  # fp32 outputs (salience, lse, relevance): fp32 arithmetic only


@pytest.fixture(autouse=True)
def _reference_backend():
    with so.use_backend("reference"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _fused_qk(T: int, H: int, D: int, dtype, g):
    """q: a view of a fused QKV tensor [T, 3, H, D]; k: a transposed [H, T, D] buffer (both strided)."""
    q = torch.randn(T, 3, H, D, generator=g).to(dtype)[:, 0]
    k = torch.randn(H, T, D, generator=g).to(dtype).transpose(0, 1)
    return q, k


def _varlen_qkv(Tq: int, Tk: int, Hq: int, Hk: int, D: int, dtype, g):
    """q: view of a fused QKV tensor [Tq, Hq + 2 Hk, D]; k: view of a fused KV tensor [Tk, 2, Hk, D];
    v: a transposed [Hk, Tk, D] buffer."""
    q = torch.randn(Tq, Hq + 2 * Hk, D, generator=g).to(dtype)[:, :Hq]
    k = torch.randn(Tk, 2, Hk, D, generator=g).to(dtype)[:, 0]
    v = torch.randn(Hk, Tk, D, generator=g).to(dtype).transpose(0, 1)
    return q, k, v


def _transposed_cache(B: int, Hk: int, T: int, D: int, dtype, g) -> torch.Tensor:
    """A ``[B, Hk, T, D]`` view of a ``[B, T, Hk, D]`` buffer."""
    return torch.randn(B, T, Hk, D, generator=g).to(dtype).transpose(1, 2)


def _segment_sums(x: torch.Tensor, lens):
    """Sum of ``x[..., a:b]`` per segment (float64), for nonempty segments."""
    starts = list(itertools.accumulate([0, *lens]))
    return [x[..., a:a + n].double().sum(-1) for a, n in zip(starts, lens) if n]


# ----------------------------------------------------------------------------------------------- Op 1: salience

SAL_CASES = [  # (segment lengths, H, D)
    ([0, 1, 7, 97], 2, 64),
    ([7, 0, 97, 1], 3, 72),
    ([97], 2, 80),
    ([1, 7, 0], 2, 128),
]


@pytest.mark.parametrize("lens,H,D", SAL_CASES)
@pytest.mark.parametrize("num_summary", [0, 1, 3])
@pytest.mark.parametrize("reduce_heads", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_visual_salience_vs_brute(lens, H, D, num_summary, reduce_heads, dtype):
    g = _gen(sum(lens) + D + num_summary)
    q, k = _fused_qk(sum(lens), H, D, dtype, g)
    cu = _cu(lens)
    out = torch.empty((sum(lens),) if reduce_heads else (H, sum(lens)))
    res = so.visual_salience(q, k, cu, max(lens), num_summary=num_summary, reduce_heads=reduce_heads,
                             out=poison(out))
    assert res is out
    want = brute.salience(q, k, cu, D ** -0.5, num_summary, reduce_heads=reduce_heads)
    assert_rel(res, want, F32_TOL, "salience")
    for total in _segment_sums(res, lens):  # each segment (per head) sums to 1
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_visual_salience_729():
    g = _gen(729)
    q, k = _fused_qk(729, 1, 72, torch.bfloat16, g)
    res = so.visual_salience(q, k, _cu([729]), 729)
    assert_rel(res, brute.salience(q, k, _cu([729]), 72 ** -0.5, 0), F32_TOL, "salience 729")
    assert abs(float(res.double().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("num_summary", [0, 3])
@pytest.mark.parametrize("reduce_heads", [True, False])
def test_visual_salience_given_lse(num_summary, reduce_heads):
    """With ``lse`` given it replaces the row normalizer: check both the true LSE and a shifted one."""
    lens, H, D = [7, 0, 30, 1], 2, 64
    q, k = _fused_qk(sum(lens), H, D, torch.float16, _gen(5))
    cu = _cu(lens)
    scale = 0.3
    _, true_lse, _ = brute.prefill(q, k, k, cu, cu, scale, causal=False)
    offsets = torch.rand(H, sum(lens), generator=_gen(6), dtype=torch.float64)
    for lse in (true_lse, true_lse + offsets):
        lse32 = lse.float()
        res = so.visual_salience(q, k, cu, 30, scale=scale, num_summary=num_summary, lse=lse32,
                                 reduce_heads=reduce_heads)
        assert_rel(res, brute.salience(q, k, cu, scale, num_summary, lse=lse32, reduce_heads=reduce_heads),
                   F32_TOL, "salience with lse")
    plain = so.visual_salience(q, k, cu, 30, scale=scale, num_summary=num_summary, reduce_heads=reduce_heads)
    assert not torch.allclose(res, plain), "the shifted lse (last loop pass) must change the result"


@pytest.mark.parametrize("reduce_heads", [True, False])
def test_visual_salience_batched_equals_varlen(reduce_heads):
    B, N, H, D = 3, 11, 2, 80
    qkv = torch.randn(B, N, 3, H, D, generator=_gen(7))
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    res = so.visual_salience(q, k, num_summary=1, reduce_heads=reduce_heads, deterministic=True)
    assert res.shape == ((B, N) if reduce_heads else (H, B, N))
    flat = so.visual_salience(q.flatten(0, 1), k.flatten(0, 1), _cu([N] * B), N, num_summary=1,
                              reduce_heads=reduce_heads)
    torch.testing.assert_close(res.reshape(flat.shape), flat, rtol=0, atol=0)
    assert_rel(flat, brute.salience(q.flatten(0, 1), k.flatten(0, 1), _cu([N] * B), D ** -0.5, 1,
                                    reduce_heads=reduce_heads), F32_TOL, "batched salience")


def test_visual_salience_single_segment_default():
    q, k = _fused_qk(13, 2, 64, torch.float32, _gen(8))
    res = so.visual_salience(q, k)
    assert_rel(res, brute.salience(q, k, _cu([13]), 64 ** -0.5, 0), F32_TOL, "single segment")


def test_visual_salience_deterministic_bitwise():
    lens = [7, 97, 1]
    q, k = _fused_qk(sum(lens), 2, 72, torch.bfloat16, _gen(9))
    a = so.visual_salience(q, k, _cu(lens), 97, deterministic=True)
    b = so.visual_salience(q, k, _cu(lens), 97, deterministic=True)
    assert torch.equal(a, b)
    assert_rel(a, so.visual_salience(q, k, _cu(lens), 97), F32_TOL, "deterministic vs default")


def test_visual_salience_chunking(monkeypatch):
    lens = [7, 97, 0, 1]
    q, k = _fused_qk(sum(lens), 3, 64, torch.float32, _gen(10))
    lse = brute.prefill(q, k, k, _cu(lens), _cu(lens), 64 ** -0.5, causal=False)[1].float()
    whole = [so.visual_salience(q, k, _cu(lens), 97, num_summary=c, lse=l, reduce_heads=False)
             for c in (0, 3) for l in (None, lse)]
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 50)  # one row per chunk for the 97-long segment
    chunked = [so.visual_salience(q, k, _cu(lens), 97, num_summary=c, lse=l, reduce_heads=False)
               for c in (0, 3) for l in (None, lse)]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------ Op 2: prefill, relevance

PREFILL_SEGS = {  # per segment (m query rows, n keys)
    "self": [(7, 7), (1, 1), (97, 97)],
    "chunked": [(7, 97), (1, 7), (0, 5), (3, 4)],  # m < n: a query chunk against a longer cache; m = 0
    "no_key": [(7, 1), (5, 0), (3, 3), (4, 2)],  # m > n: causal rows that see no key; n = 0 with m > 0
}
GQA_D = [(2, 2, 64), (4, 1, 72), (7, 1, 80), (8, 2, 128)]  # (Hq, Hk, D): groups 1, 4, 7, 4


def _rel_rows(segs, mode: str) -> torch.Tensor:
    """Per segment [r0, r1): every row, the first, the last, or none (all at the segment's edges)."""
    pick = {"all": lambda m: (0, m), "first": lambda m: (0, min(m, 1)), "last": lambda m: (max(m - 1, 0), m),
            "none": lambda m: (m, m)}[mode]
    return torch.tensor([pick(m) for m, _ in segs], dtype=torch.int32).view(-1, 2)


def _prefill_inputs(segs, Hq, Hk, D, dtype, seed):
    ms, ns = [m for m, _ in segs], [n for _, n in segs]
    q, k, v = _varlen_qkv(sum(ms), sum(ns), Hq, Hk, D, dtype, _gen(seed))
    return q, k, v, _cu(ms), _cu(ns), max(ms), max(ns)


def _sees_a_key(m: int, n: int, i: int, causal: bool) -> bool:
    return n > 0 and (not causal or i + (n - m) >= 0)


@pytest.mark.parametrize("segs", list(PREFILL_SEGS.values()), ids=list(PREFILL_SEGS))
@pytest.mark.parametrize("Hq,Hk,D", GQA_D)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["all", "first", "last", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention_relevance_vs_brute(segs, Hq, Hk, D, causal, mode, dtype):
    q, k, v, cu_q, cu_k, mq, mk = _prefill_inputs(segs, Hq, Hk, D, dtype, seed=Hq * D + len(segs))
    rel_rows = _rel_rows(segs, mode)
    Tq, Tk, G = q.shape[0], k.shape[0], Hq // Hk
    out = poison(torch.empty(Tq, Hq, D, dtype=dtype))
    lse = poison(torch.empty(Hq, Tq))
    relevance = poison(torch.empty(Hk, Tk))
    res = so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal, rel_rows=rel_rows, out=out, lse=lse,
                               relevance=relevance)
    assert res[0] is out and res[1] is lse and res[2] is relevance
    w_out, w_lse, w_rel = brute.prefill(q, k, v, cu_q, cu_k, D ** -0.5, causal, rel_rows)
    assert_rel(out, w_out, ROUND_TOL[dtype], "out")
    assert_rel(lse, w_lse, F32_TOL, "lse")  # also requires -inf exactly where the brute force has it
    assert_rel(relevance, w_rel, F32_TOL, "relevance")
    # rows that see no key: zero output, lse -inf; relevance of each group sums to G per row that sees a key
    starts_q, starts_k = _cu([m for m, _ in segs]).tolist(), _cu([n for _, n in segs]).tolist()
    for s, (m, n) in enumerate(segs):
        blind = [starts_q[s] + i for i in range(m) if not _sees_a_key(m, n, i, causal)]
        assert torch.all(out[blind] == 0) and torch.all(lse[:, blind] == float("-inf"))
        r0, r1 = rel_rows[s].tolist()
        seen = sum(_sees_a_key(m, n, i, causal) for i in range(r0, r1))
        got = relevance[:, starts_k[s]:starts_k[s + 1]].double().sum(-1)
        torch.testing.assert_close(got, torch.full((Hk,), float(G * seen), dtype=torch.float64), atol=1e-4,
                                   rtol=1e-5)
    # the same relevance from the standalone op, given the prefill's lse
    rel2 = so.kv_relevance(q, k, lse, cu_q, cu_k, mq, mk, rel_rows, causal=causal)
    torch.testing.assert_close(rel2, relevance, rtol=1e-5, atol=1e-6)
    # without rel_rows: the same attention, two outputs
    plain = so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
    assert len(plain) == 2
    torch.testing.assert_close(plain[0], out, rtol=0, atol=0)
    torch.testing.assert_close(plain[1], lse, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_kv_relevance_vs_brute_given_lse(causal):
    """kv_relevance uses the given lse as is (here shifted from the true one), over visible keys only."""
    segs = PREFILL_SEGS["chunked"]
    q, k, v, cu_q, cu_k, mq, mk = _prefill_inputs(segs, 4, 1, 72, torch.bfloat16, seed=11)
    _, true_lse, _ = brute.prefill(q, k, v, cu_q, cu_k, 0.2, causal)
    lse = (true_lse + torch.rand(true_lse.shape, generator=_gen(12), dtype=torch.float64)).float()
    rel_rows = _rel_rows(segs, "all")
    rel = so.kv_relevance(q, k, lse, cu_q, cu_k, mq, mk, rel_rows, scale=0.2, causal=causal,
                          relevance=poison(torch.empty(k.shape[1], k.shape[0])))
    assert_rel(rel, brute.kv_relevance(q, k, lse, cu_q, cu_k, 0.2, causal, rel_rows), F32_TOL, "kv_relevance")


def test_prefill_chunking(monkeypatch):
    segs = PREFILL_SEGS["chunked"] + PREFILL_SEGS["no_key"]
    q, k, v, cu_q, cu_k, mq, mk = _prefill_inputs(segs, 4, 1, 64, torch.float32, seed=13)
    rel_rows = _rel_rows(segs, "all")

    def run():
        out, lse, rel = so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, rel_rows=rel_rows)
        return out, lse, rel, so.kv_relevance(q, k, lse, cu_q, cu_k, mq, mk, rel_rows)

    whole = run()
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 100)  # 1-row chunks for the 97-key segment
    for a, b in zip(whole, run()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ Op 3: select and pack

def _assert_topk_invariants(idx: torch.Tensor, scores: torch.Tensor, vs, ve, keep: int) -> None:
    """Checks by definition (no oracle): count, -1 tail, inside the span, strictly increasing, every kept
    score >= every dropped one, and among equal scores at the threshold the lower positions are kept."""
    L = scores.shape[:-3].numel()
    flat_i, flat_s = idx.reshape(L, *idx.shape[-3:]), scores.reshape(L, *scores.shape[-3:])
    for l, b, g in itertools.product(*map(range, flat_i.shape[:3])):
        kb = min(keep, ve[b] - vs[b])
        row = flat_i[l, b, g].tolist()
        assert row[kb:] == [-1] * (keep - kb)
        sel = row[:kb]
        assert all(vs[b] <= j < ve[b] for j in sel) and sel == sorted(set(sel))
        dropped = [j for j in range(vs[b], ve[b]) if j not in sel]
        s = flat_s[l, b, g].tolist()
        if sel and dropped:
            low = min(s[j] for j in sel)
            assert low >= max(s[j] for j in dropped)
            ties_dropped = [j for j in dropped if s[j] == low]
            ties_kept = [j for j in sel if s[j] == low]
            assert not ties_dropped or max(ties_kept) < min(ties_dropped)


SPANS = ([0, 5, 9], [23, 17, 9])  # row 0: the whole cache, row 1: inside, row 2: an empty span


@pytest.mark.parametrize("keep", [0, 1, 5, 12, 23])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("layers", [None, 2])
def test_select_kv_vs_brute(keep, ties, layers):
    B, Hk, T = 3, 2, 23
    shape = (B, Hk, T) if layers is None else (layers, B, Hk, T)
    g = _gen(keep)
    if ties:  # heavy ties: three distinct values
        scores = torch.randint(0, 3, shape, generator=g).float()
    else:  # a strided view (last dim contiguous)
        scores = torch.randn(*shape[:-1], T + 6, generator=g)[..., 4:T + 4]
    idx = so.select_kv(scores, *SPANS, keep, indices=poison(torch.empty(*shape[:-1], keep, dtype=torch.int32)))
    assert idx.dtype == torch.int32 and idx.shape == (*shape[:-1], keep)
    assert torch.equal(idx.long(), brute.select(scores, *SPANS, keep))
    _assert_topk_invariants(idx, scores, *SPANS, keep)


def test_select_kv_int_span_and_all_ties():
    scores = torch.full((2, 3, 10), 0.5)
    idx = so.select_kv(scores, 2, 9, 4)
    assert idx.tolist() == [[[2, 3, 4, 5]] * 3] * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stacked", [False, True])
def test_pack_kv_vs_brute(dtype, stacked):
    L, B, Hk, T, D, keep = 2, 3, 2, 23, 72, 6
    seq_lens = [23, 20, 15]
    g = _gen(14)
    if stacked:
        k = torch.randn(L, B, T, Hk, D, generator=g).to(dtype).transpose(2, 3)
        v = torch.randn(L, B, T, Hk, D, generator=g).to(dtype).transpose(2, 3)
        k_layers, v_layers = list(k), list(v)
    else:
        k = k_layers = [_transposed_cache(B, Hk, T, D, dtype, g) for _ in range(L)]
        v = v_layers = [_transposed_cache(B, Hk, T, D, dtype, g) for _ in range(L)]
    scores = torch.randint(0, 4, (L, B, Hk, T), generator=g).float()
    idx = so.select_kv(scores, *SPANS, keep)
    need = max(vs + min(keep, ve - vs) + t - ve for vs, ve, t in zip(*SPANS, seq_lens))
    cap = need + 3
    k_out = torch.randn(L, B, Hk, cap, D, generator=g).to(dtype)
    v_out = torch.randn(L, B, Hk, cap, D, generator=g).to(dtype)
    k_before, v_before = k_out.clone(), v_out.clone()
    lengths = poison(torch.empty(B, dtype=torch.int32))
    kp, vp, ln = so.pack_kv(k, v, idx, *SPANS, cap, seq_lens, k_out=k_out, v_out=v_out, lengths=lengths)
    assert kp.data_ptr() == k_out.data_ptr() and vp.data_ptr() == v_out.data_ptr() and ln is lengths
    k_rows, want_len = brute.pack(k_layers, idx, *SPANS, seq_lens)
    v_rows, _ = brute.pack(v_layers, idx, *SPANS, seq_lens)
    assert ln.tolist() == want_len == [vs + min(keep, ve - vs) + t - ve for vs, ve, t in zip(*SPANS, seq_lens)]
    for l, b, h in itertools.product(range(L), range(B), range(Hk)):
        n = want_len[b]
        assert torch.equal(kp[l, b, h, :n].double(), k_rows[l][b, h])
        assert torch.equal(vp[l, b, h, :n].double(), v_rows[l][b, h])
        assert torch.equal(kp[l, b, h, n:], k_before[l, b, h, n:]), "slots past lengths must stay untouched"
        assert torch.equal(vp[l, b, h, n:], v_before[l, b, h, n:])


def test_pack_kv_single_layer_and_select_pack():
    B, Hk, T, D, keep = 2, 2, 17, 64, 5
    g = _gen(15)
    k, v = _transposed_cache(B, Hk, T, D, torch.float16, g), _transposed_cache(B, Hk, T, D, torch.float16, g)
    scores = torch.randn(B, Hk, T, generator=g)
    vs, ve = [3, 0], [12, 17]
    kp, vp, ln, idx = so.select_pack_kv(scores, k, v, vs, ve, keep, capacity=20)
    assert kp.shape == (B, Hk, 20, D) and idx.shape == (B, Hk, keep)
    assert torch.equal(idx.long(), brute.select(scores, vs, ve, keep))
    k2, v2, ln2 = so.pack_kv(k, v, so.select_kv(scores, vs, ve, keep), vs, ve, 20)
    assert torch.equal(ln, ln2)
    rows, want_len = brute.pack([k], idx.unsqueeze(0), vs, ve, [T, T])
    for b, h in itertools.product(range(B), range(Hk)):
        n = want_len[b]
        assert torch.equal(kp[b, h, :n], k2[b, h, :n]) and torch.equal(vp[b, h, :n], v2[b, h, :n])
        assert torch.equal(kp[b, h, :n].double(), rows[0][b, h])


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.25, 0.5, 1.0])
def test_prune_visual_tokens_vs_brute(group, keep_ratio):
    seg_lens = [8, 0, 36, 4, 20] if group == 4 else [3, 0, 9, 1]
    # multiples of 1/4: group means are exact in fp32, and ties are heavy
    sal = torch.randint(0, 4, (sum(seg_lens),), generator=_gen(16)).float() / 4
    kept = so.prune_visual_tokens(sal, seg_lens, keep_ratio, group=group)
    assert kept.dtype == torch.int64
    assert kept.tolist() == brute.prune(sal.tolist(), seg_lens, keep_ratio, group)


# ----------------------------------------------------------------------------------------------- Op 4: decode

@pytest.mark.parametrize("Hq,Hk,D", GQA_D)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_vs_brute(Hq, Hk, D, dtype):
    B, cap = 4, 13
    g = _gen(Hq + D)
    q = torch.randn(B, Hq + 2 * Hk, D, generator=g).to(dtype)[:, :Hq]
    k, v = _transposed_cache(B, Hk, cap, D, dtype, g), _transposed_cache(B, Hk, cap, D, dtype, g)
    lengths = torch.tensor([0, 1, 7, cap], dtype=torch.int32)
    out, lse = poison(torch.empty(B, Hq, D, dtype=dtype)), poison(torch.empty(B, Hq))
    res = so.decode_attention(q, k, v, lengths, scale=0.11, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    w_out, w_lse = brute.decode(q, k, v, lengths.tolist(), 0.11)
    assert_rel(out, w_out, ROUND_TOL[dtype], "decode out")
    assert_rel(lse, w_lse, F32_TOL, "decode lse")
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


def _packed_setup(dtype, seed, Hq=4, Hk=2, D=80):
    """A full cache, its top-k selection and the packed cache with spare capacity for appends."""
    B, T, keep, extra = 3, 21, 5, 3
    g = _gen(seed)
    k, v = _transposed_cache(B, Hk, T, D, dtype, g), _transposed_cache(B, Hk, T, D, dtype, g)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    vs, ve, seq_lens = [4, 0, 2], [15, 21, 4], [21, 21, 9]
    idx = so.select_kv(torch.randn(B, Hk, T, generator=g), vs, ve, keep)
    cap = max(a + min(keep, e - a) + t - e for a, e, t in zip(vs, ve, seq_lens)) + extra
    spare = [torch.randn(B, Hk, cap, D, generator=g).to(dtype) for _ in range(2)]  # finite, unlike empty()
    kp, vp, lengths = so.pack_kv(k, v, idx, vs, ve, cap, seq_lens, k_out=spare[0], v_out=spare[1])
    positions = [[brute.packed_positions(idx[b, h].tolist(), vs[b], ve[b], seq_lens[b]) for h in range(Hk)]
                 for b in range(B)]
    return q, k, v, kp, vp, lengths, positions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_over_packed_equals_attention_over_kept_rows(dtype):
    q, k, v, kp, vp, lengths, positions = _packed_setup(dtype, seed=17)
    out, lse = so.decode_attention(q, kp, vp, lengths)
    G = q.shape[1] // k.shape[1]
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        pos = positions[b][h // G]
        w_out, w_lse = brute.attend(q[b, h], k[b, h // G][pos], v[b, h // G][pos], q.shape[-1] ** -0.5)
        assert_rel(out[b, h], w_out, ROUND_TOL[dtype], f"decode over packed b={b} h={h}")
        assert abs(float(lse[b, h]) - w_lse) <= 1e-5 * max(1.0, abs(w_lse))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_decode_equals_decode_over_packed(dtype):
    q, k, v, kp, vp, lengths, positions = _packed_setup(dtype, seed=18)
    B, Hk = k.shape[:2]
    n = max(len(p[0]) for p in positions) + 2
    indices = torch.full((B, Hk, n), -1, dtype=torch.int32)  # never read past n_valid
    for b, h in itertools.product(range(B), range(Hk)):
        indices[b, h, :len(positions[b][h])] = torch.tensor(positions[b][h], dtype=torch.int32)
    out, lse = poison(torch.empty_like(q)), poison(torch.empty(B, q.shape[1]))
    so.sparse_decode_attention(q, k, v, indices, lengths, out=out, lse=lse)
    p_out, p_lse = so.decode_attention(q, kp, vp, lengths)
    torch.testing.assert_close(out, p_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, p_lse, rtol=1e-6, atol=1e-6)
    w_out, w_lse = brute.sparse_decode(q, k, v, indices, lengths.tolist(), q.shape[-1] ** -0.5)
    assert_rel(out, w_out, ROUND_TOL[dtype], "sparse decode")
    assert_rel(lse, w_lse, F32_TOL, "sparse decode lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_kv_then_decode(dtype):
    q, k, v, kp, vp, lengths, positions = _packed_setup(dtype, seed=19, Hq=7, Hk=1, D=64)
    B, Hk, cap, D = kp.shape
    start = lengths.clone()
    g = _gen(20)
    new_k, new_v = [], []
    for step in range(cap - int(start.max())):
        kv_new = torch.randn(B, 2, Hk, D, generator=g).to(dtype)  # strided views of a fused new-token tensor
        before_k, before_v = kp.clone(), vp.clone()
        so.append_kv(kv_new[:, 0], kv_new[:, 1], kp, vp, lengths)
        assert torch.equal(lengths, start + step + 1)
        for b in range(B):
            slot = int(start[b]) + step
            assert torch.equal(kp[b, :, slot], kv_new[b, 0]) and torch.equal(vp[b, :, slot], kv_new[b, 1])
            keep_mask = torch.ones(cap, dtype=torch.bool)
            keep_mask[slot] = False
            assert torch.equal(kp[b][:, keep_mask], before_k[b][:, keep_mask])
            assert torch.equal(vp[b][:, keep_mask], before_v[b][:, keep_mask])
        new_k.append(kv_new[:, 0])
        new_v.append(kv_new[:, 1])
    out, lse = so.decode_attention(q, kp, vp, lengths)
    G = q.shape[1] // Hk
    for b, h in itertools.product(range(B), range(q.shape[1])):
        pos = positions[b][h // G]
        keys = torch.cat([k[b, h // G][pos], torch.stack([x[b, h // G] for x in new_k])])
        vals = torch.cat([v[b, h // G][pos], torch.stack([x[b, h // G] for x in new_v])])
        w_out, w_lse = brute.attend(q[b, h], keys, vals, D ** -0.5)
        assert_rel(out[b, h], w_out, ROUND_TOL[dtype], "decode after append")
        assert abs(float(lse[b, h]) - w_lse) <= 1e-5 * max(1.0, abs(w_lse))


def test_segment_lse_is_the_row_logsumexp_of_each_segment():
    """reference.segment_lse (the lse fed to visual_salience by tests, fuzz and demo) vs float64 formulas."""
    g = torch.Generator().manual_seed(11)
    lens = [0, 1, 7, 97]
    q, k = torch.randn(105, 3, 16, generator=g), torch.randn(105, 3, 16, generator=g)
    cu = torch.tensor([0, 0, 1, 8, 105], dtype=torch.int32)
    got = reference.segment_lse(q, k, cu, 0.25)
    a = 0
    for n in lens:
        s = torch.einsum("ihd,jhd->hij", q[a:a + n].double(), k[a:a + n].double()) * 0.25
        assert torch.allclose(got[:, a:a + n].double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
        a += n
