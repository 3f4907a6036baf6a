"""Triton decode_attention (split-KV), append_kv, rope_append_kv and sparse_decode_attention against
sparsevila_ops.reference.

Accuracy: flash-attention's 2x rule against an fp64 run of the reference; the low-precision baseline is torch
computing in the inputs' dtype. CPU: Triton interpreter, tiny shapes. GPU (`gpu`): Qwen2-7B / Llama-2-7B
sizes and 16 decode steps (append + attention) captured in one CUDA graph.
"""

import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import reference as ref
from sparsevila_ops.autotune import run_with_config

from helpers import REL_TOL, assert_2x_rule, assert_rel, column, poison

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ref_hi(q, k, v, lengths, scale):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float64, device=q.device)
    ref.decode_attention(q.double(), k.double(), v.double(), lengths, scale, out, lse)
    return out, lse


def _ref_lo(q, k, v, lengths, scale):
    """Torch in the inputs' dtype (flash-attention's low-precision baseline): QK^T and PV in the dtype."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        kb = k[b, :, :n].repeat_interleave(G, 0)
        vb = v[b, :, :n].repeat_interleave(G, 0)
        s = torch.matmul(q[b].unsqueeze(1), kb.transpose(1, 2)) * scale  # [Hq, 1, n] in dtype
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        out[b] = torch.matmul(p, vb).squeeze(1)
    return out


def _check(out, lse, q, k, v, lengths, scale, what):
    ro, rl = _ref_hi(q, k, v, lengths, scale)
    assert_2x_rule(out, ro, _ref_lo(q, k, v, lengths, scale), what)
    assert_rel(lse, rl, 1e-5, what + " lse")  # fp32 statistics whatever the input dtype


def _inputs(B, Hk, G, cap, D, dtype, device, seed=0, strided=True):
    """q as a view of a fused [B, 3, Hq, D] tensor; k/v as transposed [B, cap, Hk, D] caches."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 3, Hk * G, D, generator=g).to(dtype).to(device)[:, 0]
    if strided:
        k = torch.randn(B, cap, Hk, D, generator=g).to(dtype).to(device).transpose(1, 2)
        v = torch.randn(B, cap, Hk, D, generator=g).to(dtype).to(device).transpose(1, 2)
    else:
        k = torch.randn(B, Hk, cap, D, generator=g).to(dtype).to(device)
        v = torch.randn(B, Hk, cap, D, generator=g).to(dtype).to(device)
    return q, k, v


def _outs(q):
    return poison(torch.empty(q.shape, dtype=q.dtype, device=q.device)), \
        poison(torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("strided_lengths", [False, True])
def test_decode_attention_matches_reference(device, dtype, G, strided_lengths):
    # B = 4: empty row, one key, a capacity-full row, a row ending mid-tile; D = 40 (not a power of two).
    B, Hk, cap, D = 4, 2, 150, 40
    q, k, v = _inputs(B, Hk, G, cap, D, dtype, device)
    lengths = torch.tensor([0, 1, cap, 83], dtype=torch.int32, device=device)
    if strided_lengths:  # a column of a wider int32 table
        lengths = column(lengths)
    scale = D ** -0.5
    out, lse = _outs(q)
    with so.use_backend("triton"):
        so.decode_attention(q, k, v, lengths, out=out, lse=lse)
    _check(out, lse, q, k, v, lengths, scale, f"decode {dtype} G={G}")
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_attention_split_counts(device, num_splits):
    # Forced split counts: one split (direct write), few, more splits than tiles.
    B, Hk, G, cap, D = 3, 1, 4, 70, 64
    q, k, v = _inputs(B, Hk, G, cap, D, torch.float16, device, seed=num_splits, strided=False)
    lengths = torch.tensor([70, 0, 17], dtype=torch.int32, device=device)
    out, lse = _outs(q)
    run_with_config("decode_attention", {"NUM_SPLITS": num_splits}, q, k, v, lengths, 0.3, out, lse)
    _check(out, lse, q, k, v, lengths, 0.3, f"splits={num_splits}")


@pytest.mark.parametrize("num_splits", [3, 8])
@pytest.mark.parametrize("gather", [False, True])
def test_decode_combine_rows_of_different_lengths(device, num_splits, gather):
    # BLOCK_N 32, so these rows use 0, 1, 2 and up to num_splits splits within one launch; the empty splits'
    # partials are never written (uninitialised scratch) and must get weight 0 in the combine.
    B, Hk, G, cap, D = 5, 2, 3, 150, 128
    q, k, v = _inputs(B, Hk, G, cap, D, torch.float32, device, seed=20 + num_splits)
    lengths = torch.tensor([0, 5, 40, cap, 97], dtype=torch.int32, device=device)
    out, lse = _outs(q)
    if gather:  # positions reversed: the gather path sees every key, in another order
        indices = torch.arange(cap - 1, -1, -1, dtype=torch.int32, device=device).expand(B, Hk, cap)
        run_with_config("sparse_decode_attention", {"NUM_SPLITS": num_splits, "BLOCK_N": 32}, q, k, v, indices,
                        lengths, 0.2, out, lse)
        k, v = k.flip(2), v.flip(2)
    else:
        run_with_config("decode_attention", {"NUM_SPLITS": num_splits, "BLOCK_N": 32}, q, k, v, lengths, 0.2, out,
                        lse)
    _check(out, lse, q, k, v, lengths, 0.2, f"combine splits={num_splits} gather={gather}")
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


def test_decode_combine_ignores_poisoned_scratch_of_empty_splits(device, monkeypatch):
    # The split scratch is torch.empty; fill it with NaN so a combine that read an empty split's partial fails.
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    B, Hk, G, cap, D = 2, 1, 4, 96, 64
    q, k, v = _inputs(B, Hk, G, cap, D, torch.float32, device, seed=41)
    lengths = torch.tensor([3, 0], dtype=torch.int32, device=device)  # 1 of 6 splits used; none used
    out, lse = _outs(q)
    monkeypatch.setattr(torch, "empty", nan_empty)
    run_with_config("decode_attention", {"NUM_SPLITS": 6, "BLOCK_N": 16}, q, k, v, lengths, 0.25, out, lse)
    monkeypatch.undo()
    _check(out, lse, q, k, v, lengths, 0.25, "poisoned scratch")
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


def test_decode_split_calls_are_deterministic(device):
    # Two calls with the split path (scratch re-allocated each call) give bit-equal results.
    B, Hk, G, cap, D = 2, 2, 4, 130, 128
    q, k, v = _inputs(B, Hk, G, cap, D, torch.float32, device, seed=31)
    lengths = torch.tensor([cap, 70], dtype=torch.int32, device=device)
    results = []
    for _ in range(2):
        out, lse = _outs(q)
        run_with_config("decode_attention", {"NUM_SPLITS": 5}, q, k, v, lengths, D ** -0.5, out, lse)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    _check(*results[0], q, k, v, lengths, D ** -0.5, "split calls")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided_lengths", [False, True])
def test_append_kv_then_decode(device, dtype, strided_lengths):
    B, Hk, G, cap, D = 2, 3, 2, 40, 32
    q, k, v = _inputs(B, Hk, G, cap, D, dtype, device, seed=7)
    g = torch.Generator().manual_seed(8)
    k_new = torch.randn(B, Hk, D, generator=g).to(dtype).to(device)
    v_new = torch.randn(B, 2, Hk, D, generator=g).to(dtype).to(device)[:, 1]  # strided
    lengths = torch.tensor([cap - 1, 5], dtype=torch.int32, device=device)
    if strided_lengths:  # bumped in place inside its table
        lengths = column(lengths)
    rk, rv, rlen = k.clone(), v.clone(), lengths.clone()
    ref.append_kv(k_new, v_new, rk, rv, rlen)
    with so.use_backend("triton"):
        so.append_kv(k_new, v_new, k, v, lengths)
        assert torch.equal(lengths, rlen) and lengths.tolist() == [cap, 6]
        assert torch.equal(k, rk) and torch.equal(v, rv)
        out, lse = so.decode_attention(q, k, v, lengths)
    _check(out, lse, q, rk, rv, rlen, D ** -0.5, "append then decode")


def _rope64(x, cos, sin):
    """float64 ``x cos + rotate_half(x) sin`` with row b's ``cos[b], sin[b]`` ([B, D]) over x [B, H, D]."""
    xf, h = x.double().cpu(), x.shape[-1] // 2
    c, s = cos.double().cpu()[:, None], sin.double().cpu()[:, None]
    return xf * c + torch.cat([-xf[..., h:], xf[..., :h]], dim=-1) * s


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype,angle_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_rope_append_kv_matches_float64(device, backend, dtype, angle_dtype):
    """q, k, v as views of one fused [B, Hq + 2 Hk, D] projection (the integration's layout), cos / sin rows of a
    wider table, lengths a strided column: out = rope(q) and the appended k within the output's rounding of the
    float64 rotation, v copied exactly, every other cache entry untouched, lengths bumped; a full row is left."""
    B, Hk, G, cap, D = 3, 2, 3, 12, 48
    g = torch.Generator().manual_seed(21)
    qkv = torch.randn(B, G * Hk + 2 * Hk, D, generator=g).to(dtype).to(device)
    q, k_new, v_new = qkv[:, :G * Hk], qkv[:, G * Hk:G * Hk + Hk], qkv[:, G * Hk + Hk:]
    angles = 6.283 * torch.rand(B, 2 * D, generator=g)
    cos, sin = (f(angles).to(angle_dtype).to(device)[:, :D] for f in (torch.cos, torch.sin))
    k, v = (torch.randn(B, Hk, cap, D, generator=g).to(dtype).to(device) for _ in range(2))
    lengths = column(torch.tensor([cap - 1, 4, 0], dtype=torch.int32, device=device))
    k0, v0, n0 = k.clone(), v.clone(), lengths.clone()
    out = poison(torch.empty(B, G * Hk, D, dtype=dtype, device=device))
    with so.use_backend(backend):
        got = so.rope_append_kv(q, k_new, v_new, cos, sin, k, v, lengths, out=out)
    assert got is out and lengths.tolist() == [cap, 5, 1]
    assert_rel(out.double().cpu(), _rope64(q, cos, sin), REL_TOL[dtype], "rope(q)")
    want_k, slots = _rope64(k_new, cos, sin), n0.tolist()
    for b, n in enumerate(slots):
        assert_rel(k[b, :, n].double().cpu(), want_k[b], REL_TOL[dtype], f"rope(k) row {b}")
        assert torch.equal(v[b, :, n], v_new[b])
        keep = [i for i in range(cap) if i != n]
        assert torch.equal(k[b, :, keep], k0[b, :, keep]) and torch.equal(v[b, :, keep], v0[b, :, keep])
    if backend == "triton":  # a full row keeps its cache and length; q is still rotated
        full = torch.full((B,), cap, dtype=torch.int32, device=device)
        k1 = k.clone()
        run_with_config("rope_append_kv", {}, q, k_new, v_new, cos, sin, k, v, full, out)
        assert torch.equal(k, k1) and full.tolist() == [cap] * B
        assert_rel(out.double().cpu(), _rope64(q, cos, sin), REL_TOL[dtype], "rope(q), full cache")


def test_rope_append_kv_default_tile_covers_the_q_heads():
    """One tile of all q heads (<= 4096 elements), 4 warps: Qwen2-7B's 28 q heads in one step, not 7 of 4."""
    from sparsevila_ops.triton_kernels.decode import RopeAppendKey, _rope_append_default
    key = lambda Hq, Hk, D: RopeAppendKey("gpu", torch.bfloat16, D, Hq, Hk, 1)  # noqa: E731
    assert [_rope_append_default(key(*h))["BLOCK_H"] for h in ((28, 4, 128), (32, 32, 128), (16, 2, 64),
                                                                  (32, 4, 256), (4, 4, 80))] == [32, 32, 16, 16, 4]
    assert _rope_append_default(key(28, 4, 128))["num_warps"] == 4


def test_rope_append_kv_rules():
    B, Hq, Hk, D, cap = 2, 4, 2, 16, 6
    q, kn = torch.randn(B, Hq, D), torch.randn(B, Hk, D)
    cs = torch.randn(B, D)
    k, v = torch.zeros(B, Hk, cap, D), torch.zeros(B, Hk, cap, D)
    n = torch.tensor([1, 2], dtype=torch.int32)
    cases = [
        (lambda: so.rope_append_kv(q, kn[:, :1], kn, cs, cs, k, v, n), ValueError, r"k_new must be \[B, Hk, D\]"),
        (lambda: so.rope_append_kv(q, kn, kn, cs[:, :8], cs, k, v, n), ValueError, r"cos must be \[B, D\] = \[2, 16\]"),
        (lambda: so.rope_append_kv(q, kn, kn.half(), cs, cs, k, v, n), TypeError, "share one dtype"),
        (lambda: so.rope_append_kv(q, kn, kn, cs, cs, k, v, torch.tensor([1, cap], dtype=torch.int32)), ValueError,
         r"lengths must lie in \[0, 5\]"),
        (lambda: so.rope_append_kv(q, kn, kn, cs, cs, k, v, n, out=torch.empty(B, Hq, 8)), ValueError,
         r"out must be \[B, Hq, D\]"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided_index", [False, True])
def test_sparse_decode_equals_decode_over_packed(device, dtype, strided_index):
    B, Hk, G, T, D, n = 2, 2, 4, 120, 48, 45
    q, k, v = _inputs(B, Hk, G, T, D, dtype, device, seed=11)
    g = torch.Generator().manual_seed(12)
    indices = torch.stack([torch.stack([torch.randperm(T, generator=g)[:n].sort().values for _ in range(Hk)])
                           for _ in range(B)]).to(torch.int32).to(device)
    n_valid = torch.tensor([n, 19], dtype=torch.int32, device=device)
    if strided_index:  # n_valid a column of a table; indices a slice of wider rows (last dim contiguous)
        n_valid = column(n_valid)
        indices = torch.cat([indices, torch.full_like(indices, -1)], dim=2)[:, :, :n]
    idx = indices.long().unsqueeze(-1).expand(-1, -1, -1, D)
    kp, vp = torch.gather(k, 2, idx), torch.gather(v, 2, idx)  # packed equivalent [B, Hk, n, D]
    out_s, lse_s = _outs(q)
    out_p, lse_p = _outs(q)
    with so.use_backend("triton"):
        so.sparse_decode_attention(q, k, v, indices, n_valid, out=out_s, lse=lse_s)
        so.decode_attention(q, kp, vp, n_valid, out=out_p, lse=lse_p)
    assert_rel(out_s.float(), out_p.float(), REL_TOL[dtype] / 10, "sparse vs packed out")
    assert_rel(lse_s, lse_p, 1e-6, "sparse vs packed lse")
    _check(out_s, lse_s, q, kp, vp, n_valid, D ** -0.5, "sparse decode")


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,ctx", [(28, 4, 32768), (32, 32, 8192), (28, 4, 131072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_real_sizes_gpu(Hq, Hk, ctx, dtype):
    B, D = 2, 128
    q, k, v = _inputs(B, Hk, Hq // Hk, ctx, D, dtype, "cuda", seed=ctx)
    lengths = torch.tensor([ctx, ctx // 3 + 5], dtype=torch.int32, device="cuda")
    out, lse = _outs(q)
    so.decode_attention(q, k, v, lengths, out=out, lse=lse)
    _check(out, lse, q, k, v, lengths, D ** -0.5, f"decode {Hq}/{Hk} {ctx} {dtype}")


@pytest.mark.gpu
def test_sparse_decode_real_sizes_gpu():
    B, Hk, G, T, D, n = 1, 4, 7, 32768, 128, 1638
    q, k, v = _inputs(B, Hk, G, T, D, torch.bfloat16, "cuda", seed=3)
    indices = torch.stack([torch.randperm(T, device="cuda")[:n].sort().values for _ in range(Hk)])[None].int()
    n_valid = torch.tensor([n], dtype=torch.int32, device="cuda")
    idx = indices.long().unsqueeze(-1).expand(-1, -1, -1, D)
    kp, vp = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    out, lse = so.sparse_decode_attention(q, k, v, indices, n_valid)
    _check(out, lse, q, kp, vp, n_valid, D ** -0.5, "sparse decode 32k")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_steps_in_one_cuda_graph_gpu(backend):
    """16 steps of (append_kv + decode_attention) captured in ONE graph and replayed equal the eager steps."""
    if backend == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cuda backend needs sm_90+")
    B, Hk, G, cap, D, steps = 2, 4, 7, 4096, 128, 16
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    k0 = torch.randn(B, Hk, cap, D, device="cuda", dtype=dt, generator=g)
    v0 = torch.randn(B, Hk, cap, D, device="cuda", dtype=dt, generator=g)
    len0 = torch.tensor([3000, 1234], dtype=torch.int32, device="cuda")
    qs = torch.randn(steps, B, Hk * G, D, device="cuda", dtype=dt, generator=g)
    kn = torch.randn(steps, B, Hk, D, device="cuda", dtype=dt, generator=g)
    vn = torch.randn(steps, B, Hk, D, device="cuda", dtype=dt, generator=g)

    def run(k, v, lengths, outs, lses):
        for i in range(steps):
            so.append_kv(kn[i], vn[i], k, v, lengths)  # Triton (no cuda implementation)
            with so.use_backend(backend):
                so.decode_attention(qs[i], k, v, lengths, out=outs[i], lse=lses[i])

    ek, ev, elen = k0.clone(), v0.clone(), len0.clone()
    eo = torch.empty(steps, B, Hk * G, D, device="cuda", dtype=dt)
    el = torch.empty(steps, B, Hk * G, device="cuda")
    run(ek, ev, elen, eo, el)

    gk, gv, glen = k0.clone(), v0.clone(), len0.clone()
    go, gl = poison(torch.empty_like(eo)), poison(torch.empty_like(el))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (JIT) outside capture, then restore the state
        run(gk, gv, glen, go, gl)
    torch.cuda.current_stream().wait_stream(s)
    gk.copy_(k0), gv.copy_(v0), glen.copy_(len0), poison(go), poison(gl)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(gk, gv, glen, go, gl)
    gk.copy_(k0), gv.copy_(v0), glen.copy_(len0), poison(go), poison(gl)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(glen, elen) and glen.tolist() == [3016, 1250]
    assert torch.equal(gk, ek) and torch.equal(gv, ev)
    assert torch.equal(go, eo) and torch.equal(gl, el)
