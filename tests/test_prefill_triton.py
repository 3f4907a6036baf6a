"""Triton prefill_attention (varlen, causal bottom-right, GQA) and kv_relevance against sparsevila_ops.reference.

Accuracy: ``out`` by flash-attention's 2x rule (float64 brute force vs torch in the inputs' dtype); ``lse`` and
``relevance`` to fp32 tolerance against the fp32 reference. CPU: Triton interpreter, tiny shapes (16-wide
tiles, so a few dozen tokens already cross full, diagonal and ragged blocks). GPU (``gpu``): Qwen2-7B and
Llama-2-7B head layouts at 4k tokens, varlen batches with awkward lengths, D 64/80/128/256.
"""
import numpy as np
import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import reference
from sparsevila_ops.autotune import run_with_config
from sparsevila_ops.triton_kernels import prefill as tk

import brute
from helpers import REL_TOL, assert_2x_rule, assert_rel, column, poison

TOL32 = REL_TOL[torch.float32]


# Segments (m queries, n keys): self-attention, no queries, chunked prefill (m < n), no keys, m > n (causal:
# the first m - n rows see no key), a single token. rel_rows: r0 = 0, empty, r1 = m, empty at r0 > 0, rows
# that see nothing included, the whole segment.
LQ = [5, 0, 19, 3, 16, 1]
LK = [5, 7, 33, 0, 9, 1]
REL = [[0, 5], [0, 0], [10, 19], [1, 1], [0, 16], [0, 1]]


def _cu(lengths, device):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=device)


def _ref_lo(q, k, v, cu_q, cu_k, scale, causal):
    """Torch in the inputs' dtype (flash-attention's low-precision baseline): QK^T, softmax and PV in it."""
    Hq, Hk = q.shape[1], k.shape[1]
    G = Hq // Hk
    out = torch.zeros_like(q)
    for (qa, qb), (ka, kb) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()),
                                  zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        m, n = qb - qa, kb - ka
        if m == 0 or n == 0:
            continue
        qs = q[qa:qb].reshape(m, Hk, G, -1).permute(1, 2, 0, 3)  # [Hk, G, m, D]
        s = torch.matmul(qs, k[ka:kb].permute(1, 2, 0).unsqueeze(1)) * scale  # [Hk, G, m, n]
        if causal:
            i = torch.arange(m, device=q.device).view(m, 1)
            j = torch.arange(n, device=q.device).view(1, n)
            s = s.masked_fill(j > i + (n - m), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = torch.matmul(p, v[ka:kb].transpose(0, 1).unsqueeze(1))  # [Hk, G, m, D]
        out[qa:qb] = o.permute(2, 0, 1, 3).reshape(m, Hq, -1)
    return out


def _ref32(q, k, v, cu_q, cu_k, mq, mk, scale, causal, rel_rows):
    """The fp32 oracle: sparsevila_ops.reference through the public API."""
    with so.use_backend("reference"):
        return so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, scale=scale, causal=causal, rel_rows=rel_rows)


def _run_triton(q, k, v, cu_q, cu_k, mq, mk, scale, causal, rel_rows):
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    out = poison(torch.empty(Tq, Hq, D, dtype=q.dtype, device=q.device))
    lse = poison(torch.empty(Hq, Tq, dtype=torch.float32, device=q.device))
    rel = poison(torch.empty(Hk, Tk, dtype=torch.float32, device=q.device))
    with so.use_backend("triton"):
        if rel_rows is None:
            so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, scale=scale, causal=causal, out=out, lse=lse)
            return out, lse
        so.prefill_attention(q, k, v, cu_q, cu_k, mq, mk, scale=scale, causal=causal, rel_rows=rel_rows,
                             out=out, lse=lse, relevance=rel)
    return out, lse, rel


def _check(q, k, v, lq, lk, rel, causal, *, scale=None, hi_on_cpu=True, strided_index=False):
    """Run the Triton op with rel_rows and check out (2x rule), lse and relevance (fp32 tolerance).
    ``strided_index``: cu_seqlens_q/k and rel_rows are columns of wider int32 tables."""
    dev = q.device
    cu_q, cu_k = _cu(lq, dev), _cu(lk, dev)
    mq, mk = max(lq), max(lk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rel_rows = torch.tensor(rel, dtype=torch.int32, device=dev)
    if strided_index:
        cu_q, cu_k, rel_rows = column(cu_q), column(cu_k), column(rel_rows)
    out, lse, relevance = _run_triton(q, k, v, cu_q, cu_k, mq, mk, scale, causal, rel_rows)
    if hi_on_cpu:
        hi_out, hi_lse, hi_rel = brute.prefill(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), scale, causal,
                                               rel_rows.cpu())
    else:
        hi_out, hi_lse, hi_rel = _ref32(q, k, v, cu_q, cu_k, mq, mk, scale, causal, rel_rows)
    lo_out = _ref_lo(q, k, v, cu_q, cu_k, scale, causal)
    assert_2x_rule(out.cpu(), hi_out.cpu(), lo_out.cpu(), "out")
    ref_out, ref_lse, ref_rel = _ref32(q, k, v, cu_q, cu_k, mq, mk, scale, causal, rel_rows)
    assert_rel(lse, ref_lse, TOL32, "lse")
    assert_rel(relevance, ref_rel, TOL32, "relevance")
    return out, lse, relevance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 1), (7, 1)])
def test_prefill_attention_relevance(device, dtype, causal, hq, hk):
    gen = torch.Generator().manual_seed(hash((str(dtype), causal, hq)) % 2**31)
    D = 24  # not a power of two: the head-dim mask is exercised
    q = torch.randn(sum(LQ), hq, D, generator=gen).to(device, dtype)
    k = torch.randn(sum(LK), hk, D, generator=gen).to(device, dtype)
    v = torch.randn(sum(LK), hk, D, generator=gen).to(device, dtype)
    out, lse, rel = _check(q, k, v, LQ, LK, REL, causal)
    if causal:  # rows 0..6 of the m=16, n=9 segment see no key
        a = sum(LQ[:4])
        assert torch.all(out[a:a + 7] == 0) and torch.all(lse[:, a:a + 7] == float("-inf"))
        assert torch.isfinite(lse[:, a + 7:a + 16]).all()
    assert torch.all(rel[:, sum(LK[:1]):sum(LK[:2])] == 0)  # the segment without queries has no relevance


def test_prefill_attention_plain(device):
    """Without rel_rows: the plain forward, through the public API and the launcher called directly."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(LQ), 4, 32, generator=gen).to(device, torch.float16)
    k = torch.randn(sum(LK), 2, 32, generator=gen).to(device, torch.float16)
    v = torch.randn(sum(LK), 2, 32, generator=gen).to(device, torch.float16)
    cu_q, cu_k = _cu(LQ, device), _cu(LK, device)
    scale = 0.3
    out, lse = _run_triton(q, k, v, cu_q, cu_k, max(LQ), max(LK), scale, True, None)
    ref_out, ref_lse = _ref32(q, k, v, cu_q, cu_k, max(LQ), max(LK), scale, True, None)
    assert_rel(out, ref_out, REL_TOL[torch.float16], "out")
    assert_rel(lse, ref_lse, TOL32, "lse")
    out2, lse2 = poison(torch.empty_like(out)), poison(torch.empty_like(lse))
    tk.prefill_attention(q, k, v, cu_q, cu_k, max(LQ), max(LK), scale, True, out2, lse2)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("layout", ["fused_qkv", "fused_qkv_3d", "transposed_kv"])
def test_strided_inputs(device, layout):
    """q/k/v as views of a fused QKV projection, or K/V caches stored head-major ([Hk, T, D] transposed)."""
    gen = torch.Generator().manual_seed(2)
    hq, hk, D, T = 4, 1, 16, 40
    lq = lk = [17, 23]
    if layout == "fused_qkv":
        qkv = torch.randn(T, hq + 2 * hk, D, generator=gen).to(device, torch.bfloat16)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    elif layout == "fused_qkv_3d":
        hk = hq
        qkv = torch.randn(T, 3, hq, D, generator=gen).to(device, torch.bfloat16)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
        hk, lq = 2, [5, 9]  # chunked prefill against a cache
        q = torch.randn(sum(lq), hq, D, generator=gen).to(device, torch.bfloat16)
        k = torch.randn(hk, T, D, generator=gen).to(device, torch.bfloat16).transpose(0, 1)
        v = torch.randn(hk, T, D, generator=gen).to(device, torch.bfloat16).transpose(0, 1)
    assert not (k.is_contiguous() or v.is_contiguous())
    rel = [[0, lq[0]], [lq[1] - 3, lq[1]]]
    _check(q, k, v, lq, lk, rel, True)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_index_tensors(device, causal):
    """cu_seqlens_q/k and rel_rows as columns of wider int32 tables (last-dim stride 3) over every segment
    kind, through the fused op and kv_relevance: the same results as with contiguous index tensors."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(LQ), 4, 24, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(sum(LK), 2, 24, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(sum(LK), 2, 24, generator=gen).to(device, torch.bfloat16)
    out, lse, rel = _check(q, k, v, LQ, LK, REL, causal, strided_index=True)
    cu_q, cu_k = _cu(LQ, device), _cu(LK, device)
    rel_rows = torch.tensor(REL, dtype=torch.int32, device=device)
    want = _run_triton(q, k, v, cu_q, cu_k, max(LQ), max(LK), 24 ** -0.5, causal, rel_rows)
    assert all(torch.equal(got, w) for got, w in zip((out, lse, rel), want))
    with so.use_backend("triton"):
        standalone = so.kv_relevance(q, k, lse, column(cu_q), column(cu_k), max(LQ), max(LK), column(rel_rows),
                                     causal=causal, relevance=poison(torch.empty_like(rel)))
    assert torch.equal(standalone, rel)


def test_split_head_dims():
    """The prefill kernel's head-dim tiles: a power of two and a >= 16-column tail where that pads less."""
    want = {16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32),
            112: (128, 0), 128: (128, 0), 160: (128, 32), 256: (256, 0)}
    assert {d: tk._split_d(d) for d in want} == want


def test_default_tiles_fill_the_gpu(monkeypatch):
    """Prefill, at most 80 columns: 128-row tiles only where they give every SM a program. Relevance, G >= 4 and
    D 128: the capped 128-key tiles from 4 programs per SM or for a whole segment (m > 1024: the fused op), else 64
    keys x 128 rows; <= 64 rows: 8 warps at D 128, 64 x 64 tiles at D 64 (x 32 for <= 32 rows); D 256: 256 x 64
    tiles, 8 warps, 3 stages where shared memory holds them (224 KB) and their grid fills the SMs about as well as
    128 x 64 tiles (160 KB) would, else those."""
    monkeypatch.setattr(tk, "sm_count_of_gpu", {"NVIDIA H200": 132}.get)
    monkeypatch.setattr(tk, "smem_per_block_of_gpu", {"NVIDIA H200": 232448, "mid": 166912, "small": 101376}.get)
    key = lambda G, Hk, D, m, n, S=1, gpu="NVIDIA H200": tk.AttentionKey(  # noqa: E731
        gpu, torch.bfloat16, D, G, Hk, True, S, m, n)
    rows = {(G, Hk, D, m, S): tk._prefill_default(key(G, Hk, D, m, m, S))["BLOCK_M"]
            for G, Hk, D, m, S in ((8, 2, 64, 1024, 1), (8, 2, 64, 4096, 1), (1, 16, 80, 2048, 1), (8, 1, 64, 2048, 1),
                                   (1, 16, 80, 4096, 1), (1, 16, 80, 784, 16), (1, 16, 80, 64, 256))}
    assert rows == {(8, 2, 64, 1024, 1): 64, (8, 2, 64, 4096, 1): 128, (1, 16, 80, 2048, 1): 128,
                    (8, 1, 64, 2048, 1): 64, (1, 16, 80, 4096, 1): 128, (1, 16, 80, 784, 16): 128,
                    (1, 16, 80, 64, 256): 64}
    assert tk._prefill_default(key(7, 4, 128, 1024, 1024))["BLOCK_M"] == 128  # wider: the H100 rule

    rel = lambda *a, **kw: tk._relevance_default(key(*a, **kw))  # noqa: E731
    capped = dict(BLOCK_N=128, BLOCK_P=64, num_warps=4, num_stages=2, maxnreg=168)
    assert rel(7, 4, 128, 256, 32768) == capped  # 1024 programs of 128 keys
    assert rel(4, 8, 128, 512, 4096)["BLOCK_P"] == 128  # 256 programs
    assert rel(7, 4, 128, 16384, 16384) == capped  # 512 programs, but m is the fused op's segment
    assert rel(1, 32, 128, 512, 4096) == capped  # G < 4: always
    assert rel(7, 4, 128, 64, 8192) == dict(BLOCK_N=128, BLOCK_P=64, num_warps=8, num_stages=3)
    assert rel(8, 2, 64, 64, 8192) == dict(BLOCK_N=64, BLOCK_P=64, num_warps=4, num_stages=3)
    assert rel(8, 2, 64, 32, 16384) == dict(BLOCK_N=64, BLOCK_P=32, num_warps=4, num_stages=4)
    widest = rel(8, 4, 256, 128, 16384)  # 256 programs of 256 keys: two full waves
    assert widest == dict(BLOCK_N=256, BLOCK_P=64, num_warps=8, num_stages=3)
    assert tk._relevance_resources(key(8, 4, 256, 128, 16384), widest)[0] == 224 * 1024
    wide = rel(8, 4, 256, 512, 4096)  # 64 programs of 256 keys would leave half the SMs idle; 128 of 128 keys
    assert wide == dict(BLOCK_N=128, BLOCK_P=64, num_warps=8, num_stages=3)
    assert tk._relevance_resources(key(8, 4, 256, 512, 4096), wide)[0] == 160 * 1024
    assert rel(8, 4, 256, 128, 16384, gpu="mid") == wide  # 166 KB: 224 KB tiles do not fit
    assert rel(8, 4, 256, 128, 16384, gpu="small") == dict(BLOCK_N=64, BLOCK_P=64, num_warps=4, num_stages=2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [40, 64, 72, 80, 96])
def test_head_dims(device, D, causal):
    """Head dims the kernel splits (40 = 32 + 16 with a masked tail, 72 likewise, 80 and 96 exact) and one it does
    not (64)."""
    gen = torch.Generator().manual_seed(D)
    lq, lk = [20, 7], [20, 30]
    q = torch.randn(sum(lq), 2, D, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(sum(lk), 1, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(sum(lk), 1, D, generator=gen).to(device, torch.bfloat16)
    _check(q, k, v, lq, lk, [[12, 20], [0, 7]], causal)


@pytest.mark.parametrize("causal", [True, False])
def test_kv_relevance_equals_fused(device, causal):
    """kv_relevance on the fused op's lse gives its relevance bit for bit (same kernel, deterministic), and
    on the reference's lse it matches reference.kv_relevance."""
    gen = torch.Generator().manual_seed(3)
    hq, hk, D = 7, 1, 16
    q = torch.randn(sum(LQ), hq, D, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(sum(LK), hk, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(sum(LK), hk, D, generator=gen).to(device, torch.bfloat16)
    cu_q, cu_k = _cu(LQ, device), _cu(LK, device)
    rel_rows = torch.tensor(REL, dtype=torch.int32, device=device)
    args = (cu_q, cu_k, max(LQ), max(LK))
    out, lse, rel = _run_triton(q, k, v, *args, D ** -0.5, causal, rel_rows)
    with so.use_backend("triton"):
        standalone = so.kv_relevance(q, k, lse, *args, rel_rows, causal=causal,
                                     relevance=poison(torch.empty_like(rel)))
    assert torch.equal(standalone, rel)

    _, ref_lse = _ref32(q, k, v, *args, D ** -0.5, causal, None)
    mine = poison(torch.empty_like(rel))
    tk.kv_relevance(q, k, ref_lse, *args, D ** -0.5, causal, rel_rows, mine)
    expected = torch.empty_like(rel)
    reference.kv_relevance(q, k, ref_lse, *args, D ** -0.5, causal, rel_rows, expected)
    assert_rel(mine, expected, TOL32, "kv_relevance")
    assert_rel(mine, brute.kv_relevance(q.cpu(), k.cpu(), ref_lse.cpu(), cu_q.cpu(), cu_k.cpu(), D ** -0.5, causal,
                                        rel_rows.cpu()), TOL32, "kv_relevance vs fp64")


# Segments (m, n) and rel rows [r0, r1) that cross every path of _kv_relevance_kernel at the CPU tiles (16 keys
# x 16 rows): 40 x 70 rows [3, 37) has causal-diagonal key blocks whose row tiles straddle the masked/unmasked
# split, a last partial row tile (34 rows = 16 + 16 + 2) and keys past n in its last key block (70 = 4 * 16 + 6);
# 33 x 33 rows [14, 33): key block 0 has one masked row (14) before the unmasked ones, so a split one row too
# late shows; 20 x 50 only the last row; 30 x 12 (m > n: rows 0..17 see no key, lse = -inf); 17 x 48 all rows
# (chunked prefill); 9 x 25 only the first row.
TILE_M = [40, 33, 20, 30, 17, 9]
TILE_N = [70, 33, 50, 12, 48, 25]
TILE_REL = [[3, 37], [14, 33], [19, 20], [0, 30], [0, 17], [0, 1]]


def _rows_seeing_a_key(m, n, r0, r1, causal):
    return sum(1 for i in range(r0, r1) if n > 0 and (not causal or i + n - m >= 0))


@pytest.mark.parametrize("causal,hq,hk,layout,dtype", [
    (True, 14, 2, "contiguous", torch.bfloat16), (False, 14, 2, "contiguous", torch.bfloat16),
    (True, 4, 1, "strided", torch.float16), (True, 3, 3, "strided", torch.bfloat16),
    (False, 3, 3, "contiguous", torch.float32), (True, 4, 1, "contiguous", torch.float32),
], ids=["G7-causal", "G7", "G4-causal-strided", "G1-causal-strided", "G1-fp32", "G4-causal-fp32"])
def test_kv_relevance_tiles(device, causal, hq, hk, layout, dtype):
    """kv_relevance (public API, then the launcher with BLOCK_P != BLOCK_N) vs reference.kv_relevance on the
    reference's lse, plus the invariant: each KV head's relevance over a segment sums to G x (rel rows that
    see at least one key), since each such row's softmax sums to 1."""
    gen = torch.Generator().manual_seed(hq * 10 + hk + causal)
    D = 24  # BLOCK_D 32: the head-dim mask is exercised
    Tq, Tk = sum(TILE_M), sum(TILE_N)
    if layout == "strided":  # q a view of a fused QKV projection; k a head-major cache transposed, or with
        q = torch.randn(Tq, 3, hq, D, generator=gen).to(device, dtype)[:, 0]  # one KV head a fused-KV view
        if hk > 1:
            k = torch.randn(hk, Tk, D, generator=gen).to(device, dtype).transpose(0, 1)
        else:
            k = torch.randn(Tk, 2, hk, D, generator=gen).to(device, dtype)[:, 0]
        assert not (q.is_contiguous() or k.is_contiguous())
    else:
        q = torch.randn(Tq, hq, D, generator=gen).to(device, dtype)
        k = torch.randn(Tk, hk, D, generator=gen).to(device, dtype)
    cu_q, cu_k = _cu(TILE_M, device), _cu(TILE_N, device)
    rel_rows = torch.tensor(TILE_REL, dtype=torch.int32, device=device)
    args = (cu_q, cu_k, max(TILE_M), max(TILE_N))
    scale = D ** -0.5
    _, lse = _ref32(q, k, k, *args, scale, causal, None)
    expected = torch.empty(hk, Tk, dtype=torch.float32, device=device)
    reference.kv_relevance(q, k, lse, *args, scale, causal, rel_rows, expected)

    with so.use_backend("triton"):
        got = so.kv_relevance(q, k, lse, *args, rel_rows, scale=scale, causal=causal,
                              relevance=poison(torch.empty_like(expected)))
    assert_rel(got, expected, TOL32, "kv_relevance")
    G = hq // hk
    for (ka, kb), m, n, (r0, r1) in zip(zip(cu_k[:-1].tolist(), cu_k[1:].tolist()), TILE_M, TILE_N, TILE_REL):
        want = G * _rows_seeing_a_key(m, n, r0, r1, causal)
        torch.testing.assert_close(got[:, ka:kb].double().sum(dim=1).cpu(), torch.full((hk,), float(want),
                                   dtype=torch.float64), rtol=1e-4, atol=1e-4)

    for cfg in (dict(BLOCK_N=32, BLOCK_P=16, num_warps=4, num_stages=1),
                dict(BLOCK_N=16, BLOCK_P=32, num_warps=4, num_stages=1)):
        mine = poison(torch.empty_like(expected))
        run_with_config("kv_relevance", cfg, q, k, lse, *args, scale, causal, rel_rows, mine)
        assert_rel(mine, expected, TOL32, f"kv_relevance {cfg}")


# ---------------------------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(28, 4), (32, 32)], ids=["qwen2-7b", "llama2-7b"])
def test_gpu_model_shapes(hq, hk):
    """A 4k-token causal prefill with 256 question rows (the last ones), bf16, D 128."""
    torch.manual_seed(0)
    N, D, M = 4096, 128, 256
    q = torch.randn(N, hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(N, hk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(N, hk, D, device="cuda", dtype=torch.bfloat16)
    _check(q, k, v, [N], [N], [[N - M, N]], True, hi_on_cpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (64, torch.float16), (80, torch.bfloat16),
                                     (72, torch.bfloat16), (96, torch.float16), (80, torch.float32),
                                     (256, torch.float16), (128, torch.float32)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_varlen(D, dtype, causal):
    """Varlen batch with awkward lengths, chunked segments, an empty one and m > n; GQA 28/4."""
    torch.manual_seed(D)
    lq = [1, 97, 1025, 0, 729, 300, 2048]
    lk = [1, 97, 1500, 5, 729, 200, 5125]
    rel = [[0, 1], [90, 97], [0, 1025], [0, 0], [700, 700], [0, 300], [1792, 2048]]
    q = torch.randn(sum(lq), 28, D, device="cuda", dtype=dtype)
    kv = torch.randn(sum(lk), 2, 4, D, device="cuda", dtype=dtype)  # strided k, v views
    _check(q, kv[:, 0], kv[:, 1], lq, lk, rel, causal, hi_on_cpu=False)
