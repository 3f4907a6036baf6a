"""Index tensors with a non-unit stride (a column of a wider int32 table: the validators accept them) give the
results of their contiguous copies on every backend (issue #11 repros), and ``pack_kv`` rejects indices that
are not cache positions inside the visual span.
"""
import pytest
import torch

import sparsevila_ops as so
from helpers import poison

BACKENDS = ["reference", "triton"]


def _column(rows, device):
    """Column 0 of the int32 table ``rows``: a view with stride 2 (its other column is a decoy)."""
    t = torch.tensor(rows, dtype=torch.int32, device=device)[..., 0]
    assert t.stride(-1) == 2
    return t


def _randn(*shape, device, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_strided_lengths(device, backend):
    """Row 1 has 3 keys; a contiguous read of ``lengths`` sees the decoy 0 and returns an empty row."""
    q, k, v = _randn(2, 4, 16, device=device), _randn(2, 2, 8, 16, device=device, seed=1), \
        _randn(2, 2, 8, 16, device=device, seed=2)
    lengths = _column([[8, 0], [3, 0]], device)
    with so.use_backend(backend):
        out, lse = so.decode_attention(q, k, v, lengths, out=poison(torch.empty_like(q)),
                                       lse=poison(torch.empty(2, 4, device=device)))
        want_out, want_lse = so.decode_attention(q, k, v, lengths.contiguous())
    assert torch.isfinite(lse).all()
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_kv_strided_lengths(device, backend):
    """Writes slots [2, 5] and bumps column 0 of the table in place (not slots [2, 0] and the decoy)."""
    k_new, v_new = _randn(2, 2, 16, device=device), _randn(2, 2, 16, device=device, seed=1)
    k_cache, v_cache = torch.zeros(2, 2, 8, 16, device=device), torch.zeros(2, 2, 8, 16, device=device)
    table = torch.tensor([[2, 0], [5, 0]], dtype=torch.int32, device=device)
    want_k, want_v, want_len = k_cache.clone(), v_cache.clone(), table[:, 0].contiguous()
    with so.use_backend(backend):
        so.append_kv(k_new, v_new, k_cache, v_cache, table[:, 0])
        so.append_kv(k_new, v_new, want_k, want_v, want_len)
    assert table.tolist() == [[3, 0], [6, 0]] and torch.equal(table[:, 0], want_len)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(k_cache[0, :, 2], k_new[0]) and torch.equal(k_cache[1, :, 5], k_new[1])


@pytest.mark.parametrize("op", ["prefill_attention", "prefill_attention_relevance", "kv_relevance"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_strided_cu_seqlens(device, backend, op):
    """One segment of 5 queries and 5 keys; a contiguous read of ``cu = [0, 5]`` sees [0, 0]: nothing written."""
    q, k, v = _randn(5, 4, 16, device=device), _randn(5, 2, 16, device=device, seed=1), \
        _randn(5, 2, 16, device=device, seed=2)
    cu = _column([[0, 0], [5, 5]], device)
    rel_rows = torch.tensor([[1, 5]], dtype=torch.int32, device=device)

    def run(c):
        outs = (poison(torch.empty_like(q)), poison(torch.empty(4, 5, device=device)),
                poison(torch.empty(2, 5, device=device)))
        if op == "prefill_attention":
            return so.prefill_attention(q, k, v, c, c, 5, 5, out=outs[0], lse=outs[1])
        if op == "prefill_attention_relevance":
            return so.prefill_attention(q, k, v, c, c, 5, 5, rel_rows=rel_rows, out=outs[0], lse=outs[1],
                                        relevance=outs[2])
        _, lse = so.prefill_attention(q, k, v, cu.contiguous(), cu.contiguous(), 5, 5)
        return (so.kv_relevance(q, k, lse, c, c, 5, 5, rel_rows, relevance=outs[2]),)

    with so.use_backend(backend):
        got, want = run(cu), run(cu.contiguous())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_kv_strided_indices(device, backend):
    """indices [1, 3, 6] with last-dim stride 2; a contiguous read packs [1, 0, 3]."""
    T, D = 10, 16
    k = torch.arange(T, dtype=torch.float32, device=device).view(1, 1, T, 1).expand(1, 1, T, D).contiguous()
    v = -k
    indices = _column([[[[1, 0], [3, 0], [6, 0]]]], device)  # [1, 1, 3]
    with so.use_backend(backend):
        kp, vp, lengths = so.pack_kv(k, v, indices, 1, 8, 8)
        want_k, want_v, want_len = so.pack_kv(k, v, indices.contiguous(), 1, 8, 8)
    assert lengths.tolist() == [6] and kp[0, 0, :6, 0].tolist() == [0, 1, 3, 6, 8, 9]
    assert torch.equal(lengths, want_len)
    assert torch.equal(kp[..., :6, :], want_k[..., :6, :]) and torch.equal(vp[..., :6, :], want_v[..., :6, :])


# pack_kv's base call: B = 2 rows with spans [1, 8) and [0, 2), keep 3 (row 1 keeps 2: its slot 2 is the -1 tail).
PACK_SPANS = ([1, 0], [8, 2])
PACK_INDICES = [[[1, 4, 6], [2, 3, 7]], [[0, 1, -1], [1, 0, -1]]]


def _pack_with(change):
    idx = torch.tensor(PACK_INDICES, dtype=torch.int32)
    for pos, val in change:
        idx[pos] = val
    k = torch.randn(2, 2, 10, 8, generator=torch.Generator().manual_seed(0))
    return so.pack_kv(k, k, idx, *PACK_SPANS, 10)


def test_pack_kv_accepts_valid_indices():
    with so.use_backend("reference"):
        _, _, lengths = _pack_with([])
    assert lengths.tolist() == [1 + 3 + 2, 0 + 2 + 8]


@pytest.mark.parametrize("change,pattern", [
    ([((0, 1, 0), 0)], r"indices\[0, 1, 0\] must lie in \[vis_start, vis_end\) = \[1, 8\).*got 0"),
    ([((0, 0, 2), 8)], r"indices\[0, 0, 2\] must lie in \[vis_start, vis_end\) = \[1, 8\).*got 8"),
    ([((1, 1, 1), 10)], r"indices\[1, 1, 1\] must lie in \[vis_start, vis_end\) = \[0, 2\).*got 10"),
    ([((1, 0, 0), -1)], r"indices\[1, 0, 0\] must lie in \[vis_start, vis_end\) = \[0, 2\).*got -1"),
    ([((1, 0, 2), 1)], r"indices\[1, 0, 2\] must be -1 .*got 1"),
], ids=["below-span", "at-span-end", "past-T", "minus-one-kept", "tail-not-minus-one"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_kv_rejects_indices_outside_the_span(backend, change, pattern):
    with so.use_backend(backend), pytest.raises(ValueError, match=pattern):
        _pack_with(change)
