"""Triton select_kv (radix top-k) and pack_kv (all layers in one launch) against sparsevila_ops.reference.

CPU: the kernels run under Triton's interpreter at tiny shapes. GPU (`gpu`): Qwen2-7B / Llama-2-7B sizes.
"""

import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import reference as ref

from helpers import column


def _i32(vals, device):
    return torch.tensor(vals, dtype=torch.int32, device=device)


def _triton_select(scores, vs, ve, keep):
    shape = (*scores.shape[:-1], keep)
    indices = torch.full(shape, -12345, dtype=torch.int32, device=scores.device)
    with so.use_backend("triton"):
        return so.select_kv(scores, vs, ve, keep, indices=indices)


def _ref_select(scores, vs, ve, keep):
    indices = torch.empty(*scores.shape[:-1], keep, dtype=torch.int32, device=scores.device)
    ref.select_kv(scores, _i32(vs, scores.device), _i32(ve, scores.device), keep, indices)
    return indices


def _check_topk_invariants(scores, vs, ve, keep, indices):
    """Against torch.topk as sets: same multiset of kept scores, sorted positions, ties to lower positions."""
    s = scores.reshape(-1, scores.shape[-3], scores.shape[-2], scores.shape[-1])
    idx = indices.reshape(*s.shape[:-1], keep)
    for b, (a, e) in enumerate(zip(vs, ve)):
        kb = min(keep, e - a)
        assert (idx[:, b, :, kb:] == -1).all()
        if kb == 0:
            continue
        span = s[:, b, :, a:e]
        sel = idx[:, b, :, :kb].long()
        assert ((sel >= a) & (sel < e)).all()
        assert (sel[..., 1:] > sel[..., :-1]).all(), "indices must be strictly increasing"
        got = torch.gather(s[:, b], -1, sel)
        top = torch.topk(span, kb, dim=-1).values
        assert torch.equal(got.sort(dim=-1, descending=True).values, top)
        thr = top[..., -1:]
        # Every unselected position scores below thr, or ties with it at a higher position than every kept tie.
        chosen = torch.zeros_like(span, dtype=torch.bool).scatter_(-1, sel - a, True)
        pos = torch.arange(a, e, device=s.device).expand_as(span)
        last_tie = torch.where(chosen & (span == thr), pos, -1).amax(dim=-1, keepdim=True)
        bad = ~chosen & ((span > thr) | ((span == thr) & (pos < last_tie)))
        assert not bad.any()


def _scores(shape, kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g)
    if kind == "ties":
        s = torch.randint(0, 4, shape, generator=g).float() - 1.5
    elif kind == "inf":
        s = torch.randint(0, 3, shape, generator=g).float()
        s[..., ::7] = float("inf")
        s[..., 3::11] = float("-inf")
        s[..., 5::13] = -0.0
    return s.to(device)


@pytest.mark.parametrize("kind", ["randn", "ties", "inf"])
@pytest.mark.parametrize("keep", [0, 1, 9, 60, 150])
def test_select_kv_matches_reference(device, kind, keep):
    # B = 3 rows with different spans: an empty one, a short one (keep > span), a long one; 2 stacked layers.
    L, B, H, T = 2, 3, 2, 200
    vs, ve = [5, 0, 20], [5, 40, 197]
    scores = _scores((L, B, H, T), kind, device)
    out = _triton_select(scores, vs, ve, keep)
    assert torch.equal(out, _ref_select(scores, vs, ve, keep))
    _check_topk_invariants(scores, vs, ve, keep, out)


def test_select_kv_strided_scores_single_layer(device):
    # [B, Hk, T] view with non-contiguous outer dims; a span that fills the row; keep == span.
    base = _scores((2, 3, 130), "ties", device, seed=1)  # [Hk, B, T]
    scores = base.transpose(0, 1)[:, :, :]
    assert not scores.is_contiguous()
    for keep in (130, 64):
        out = _triton_select(scores, [0, 0, 0], [130, 130, 130], keep)
        assert torch.equal(out, _ref_select(scores, [0, 0, 0], [130, 130, 130], keep))


def test_select_kv_launcher_direct(device):
    from sparsevila_ops.triton_kernels.select import select_kv as launch
    scores = _scores((1, 2, 1, 77), "inf", device, seed=2)
    idx = torch.full((1, 2, 1, 20), -7, dtype=torch.int32, device=device)
    launch(scores, _i32([3, 10], device), _i32([70, 25], device), 20, idx)
    assert torch.equal(idx, _ref_select(scores, [3, 10], [70, 25], 20))


def test_select_default_chunk_is_the_largest_power_of_two_within_the_row():
    """The chunk does not pass T (the loop covers only the visual span, a little shorter): 1024 visual tokens in a
    row of T = 1152 take one 1024-chunk per pass; 128 at least, 4096 at most, 8 warps from 2048."""
    from sparsevila_ops.triton_kernels.select import SelectKey, _select_default
    want = {1: 128, 200: 128, 1024: 1024, 1152: 1024, 2128: 2048, 4095: 2048, 8320: 4096, 131200: 4096}
    got = {T: _select_default(SelectKey("NVIDIA H200", 112, T)) for T in want}
    assert {T: cfg["BLOCK"] for T, cfg in got.items()} == want
    assert all(cfg["num_warps"] == (8 if cfg["BLOCK"] >= 2048 else 4) for cfg in got.values())


def _pack_inputs(layout, L, B, H, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "stacked":  # one [L, B, T, H, D] allocation viewed as [L, B, H, T, D]: uniform layer stride
        k = torch.randn(L, B, T, H, D, generator=g).to(dtype).to(device).transpose(2, 3)
        v = torch.randn(L, B, T, H, D, generator=g).to(dtype).to(device).transpose(2, 3)
        return k, v, list(k.unbind(0)), list(v.unbind(0))
    # separate non-contiguous allocations: the pointer-table path
    ks = [torch.randn(B, T, H, D, generator=g).to(dtype).to(device).transpose(1, 2) for _ in range(L)]
    vs_ = [torch.randn(B, H, T, 2 * D, generator=g).to(dtype).to(device)[..., :D] for _ in range(L)]
    if layout == "mixed":  # strides differ between layers: per-layer launches
        ks[1] = ks[1].contiguous()
    return ks, vs_, ks, vs_


@pytest.mark.parametrize("layout", ["stacked", "list", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided_indices", [False, True])
def test_pack_kv_matches_ordered_gather(device, layout, dtype, strided_indices):
    L, B, H, T, D, keep, cap = 3, 2, 2, 60, 24, 11, 64
    vs, ve, sl = [4, 0], [50, 8], [57, 60]
    k, v, k_list, v_list = _pack_inputs(layout, L, B, H, T, D, dtype, device)
    indices = _ref_select(_scores((L, B, H, T), "ties", device), vs, ve, keep)
    if strided_indices:  # a column of a wider int32 table: last-dim stride 3
        indices = column(indices)
    g = torch.Generator().manual_seed(9)
    init_k = torch.randn(L, B, H, cap, D, generator=g).to(dtype).to(device)
    init_v = torch.randn(L, B, H, cap, D, generator=g).to(dtype).to(device)
    k_out, v_out = init_k.clone(), init_v.clone()
    lengths = torch.full((B,), -12345, dtype=torch.int32, device=device)
    with so.use_backend("triton"):
        so.pack_kv(k, v, indices, vs, ve, cap, sl, k_out=k_out, v_out=v_out, lengths=lengths)
    rk, rv = init_k.clone(), init_v.clone()
    rlen = torch.empty_like(lengths)
    ref.pack_kv(k_list, v_list, indices, _i32(vs, device), _i32(ve, device), _i32(sl, device), rk, rv, rlen)
    assert lengths.tolist() == [4 + 11 + 7, 0 + 8 + 52] == rlen.tolist()
    assert torch.equal(k_out, rk) and torch.equal(v_out, rv)  # includes the untouched slots past lengths
    for b, n in enumerate(rlen.tolist()):
        assert torch.equal(k_out[:, b, :, n:], init_k[:, b, :, n:])


def test_select_pack_kv_single_layer(device):
    B, H, T, D, keep, cap = 2, 3, 40, 16, 6, 48
    k, v, _, _ = _pack_inputs("stacked", 1, B, H, T, D, torch.float16, device, seed=3)
    scores = _scores((B, H, T), "randn", device, seed=3)
    with so.use_backend("triton"):
        kp, vp, lengths, idx = so.select_pack_kv(scores, k[0], v[0], [2, 5], [30, 39], keep, cap)
    ridx = _ref_select(scores, [2, 5], [30, 39], keep)
    assert torch.equal(idx, ridx)
    for b, (a, e) in enumerate([(2, 30), (5, 39)]):
        n = a + keep + T - e
        assert lengths[b].item() == n
        for g in range(H):
            pos = ref.packed_positions(ridx[b, g], a, e, T)
            assert torch.equal(kp[b, g, :n], k[0, b, g, pos]) and torch.equal(vp[b, g, :n], v[0, b, g, pos])


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["qwen2", "llama2"])
def test_select_pack_real_sizes_gpu(model):
    L, H = (28, 4) if model == "qwen2" else (32, 32)
    B, D, n_vis = 1, 128, 32768 if model == "qwen2" else 8192
    vs, ve, T = 100, 100 + n_vis, n_vis + 164
    keep = n_vis // 20
    torch.manual_seed(0)
    scores = (torch.rand(L, B, H, T, device="cuda") * 4096).floor()  # ~8 exact ties per value
    idx = _triton_select(scores, [vs], [ve], keep)
    assert torch.equal(idx, _ref_select(scores, [vs], [ve], keep))
    k = torch.randn(L, B, H, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(L, B, H, T, D, device="cuda", dtype=torch.bfloat16)
    cap = vs + keep + (T - ve) + 16
    with so.use_backend("triton"):
        for layers in (k, [x.clone() for x in k.unbind(0)]):  # stacked, then the pointer table
            kp, vp, lengths = so.pack_kv(layers, list(v.unbind(0)), idx, [vs], [ve], cap)
            n = lengths.item()
            assert n == cap - 16
            for layer in (0, L - 1):
                pos = ref.packed_positions(idx[layer, 0, H - 1], vs, ve, T)
                assert torch.equal(kp[layer, 0, H - 1, :n], k[layer, 0, H - 1, pos])
                assert torch.equal(vp[layer, 0, H - 1, :n], v[layer, 0, H - 1, pos])
            rk = torch.empty_like(kp)
            rv = torch.empty_like(vp)
            rl = torch.empty_like(lengths)
            ref.pack_kv(list(k.unbind(0)), list(v.unbind(0)), idx, _i32([vs], "cuda"), _i32([ve], "cuda"),
                        _i32([T], "cuda"), rk, rv, rl)
            assert torch.equal(kp[..., :n, :], rk[..., :n, :]) and torch.equal(vp[..., :n, :], rv[..., :n, :])
