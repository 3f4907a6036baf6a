"""visual_salience on the Triton backend vs the torch reference (fp32 oracle).

CPU: the kernels run under Triton's interpreter at tiny shapes. GPU (`gpu` marker): the benchmark shapes
(SigLIP 64 frames, QwenVL 4k / 16k, 64-patch windows) and awkward lengths.
"""
import numpy as np
import pytest
import torch

import sparsevila_ops
from sparsevila_ops import reference
from sparsevila_ops.autotune import run_with_config
from sparsevila_ops.triton_kernels import salience as tk

from helpers import REL_TOL, assert_rel, poison


def _cu(lengths, device):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=device)


def _inputs(T, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g).to(dtype).to(device)
    k = torch.randn(T, H, D, generator=g).to(dtype).to(device)
    return q, k


def _salience(backend, q, k, cu, max_seqlen, **kw):
    with sparsevila_ops.use_backend(backend):
        return sparsevila_ops.visual_salience(q, k, cu, max_seqlen, **kw)


def _poisoned(T, H, reduce_heads, device):
    return poison(torch.empty((T,) if reduce_heads else (H, T), dtype=torch.float32, device=device))


def _check(q, k, cu, max_seqlen, dtype, **kw):
    T, H = q.shape[:2]
    out = _poisoned(T, H, kw.get("reduce_heads", True), q.device)
    got = _salience("triton", q, k, cu, max_seqlen, out=out, **kw)
    ref = _salience("reference", q, k, cu, max_seqlen, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert_rel(got, ref, REL_TOL[dtype], f"visual_salience {kw}")
    return got, ref


# Segments: ragged, an empty one and a length-1 one.
RAGGED = [37, 0, 1, 62]


@pytest.mark.parametrize("dtype,D,c,reduce_heads", [
    (torch.float32, 16, 0, True), (torch.float32, 72, 0, False), (torch.float32, 80, 1, True),
    (torch.float32, 40, 3, False), (torch.bfloat16, 72, 0, True), (torch.bfloat16, 80, 3, True),
    (torch.bfloat16, 16, 1, False), (torch.float16, 80, 0, False), (torch.float32, 8, 0, True),
])
def test_visual_salience_parity(device, dtype, D, c, reduce_heads):
    cu = _cu(RAGGED, device)
    q, k = _inputs(int(cu[-1]), 3, D, dtype, device)
    _check(q, k, cu, max(RAGGED), dtype, num_summary=c, reduce_heads=reduce_heads)


@pytest.mark.parametrize("c", [0, 3])
def test_visual_salience_multiblock_tails(device, c):
    """16-wide tiles: several full key/row blocks plus masked tails in both passes (the LSE pass into a scratch,
    then the column sums from it, as the op runs them; one block, several, and a single row)."""
    tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    lengths = [53, 16, 1]
    cu = _cu(lengths, device)
    T, H, D = int(cu[-1]), 2, 72
    q, k = _inputs(T, H, D, torch.float32, device, seed=1)
    lse2 = torch.full((H, T), float("nan"), device=device)
    run_with_config("visual_salience.lse", tiles, q, k, cu, max(lengths), D ** -0.5, c, lse2)
    got = _poisoned(T, H, False, device)
    run_with_config("visual_salience.colsum", tiles, q, k, cu, max(lengths), D ** -0.5, c, lse2,
                    True, False, got)
    ref = _salience("reference", q, k, cu, max(lengths), num_summary=c, reduce_heads=False)
    assert_rel(got, ref, REL_TOL[torch.float32], f"16-wide tiles, c={c}")


def test_visual_salience_windows(device):
    """Window segmentation (many small segments, Qwen2.5-VL window layers); each segment sums to 1 per head."""
    lengths = [8] * 11 + [5, 0, 3]
    cu = _cu(lengths, device)
    q, k = _inputs(int(cu[-1]), 2, 80, torch.bfloat16, device, seed=2)
    got, _ = _check(q, k, cu, 8, torch.bfloat16, reduce_heads=False)
    sums = torch.stack([got[:, a:b].sum(1) for a, b, n in zip(cu[:-1].tolist(), cu[1:].tolist(), lengths) if n])
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_visual_salience_lse_given_equals_two_passes(device, dtype):
    cu = _cu(RAGGED, device)
    T, H, D = int(cu[-1]), 2, 72
    q, k = _inputs(T, H, D, dtype, device, seed=3)
    lse_full = torch.randn(H, T + 5, device=device)  # strided [H, T] view (row stride T + 5)
    lse = lse_full[:, :T]
    lse.copy_(reference.segment_lse(q, k, cu, D ** -0.5))
    for c in (0, 3):
        two = _salience("triton", q, k, cu, max(RAGGED), num_summary=c, reduce_heads=False)
        one = _salience("triton", q, k, cu, max(RAGGED), num_summary=c, reduce_heads=False, lse=lse,
                        out=_poisoned(T, H, False, device))
        ref = _salience("reference", q, k, cu, max(RAGGED), num_summary=c, reduce_heads=False, lse=lse)
        assert_rel(one, two, 1e-5, f"lse given vs two passes, c={c}")
        assert_rel(one, ref, REL_TOL[dtype], f"lse given vs reference, c={c}")


def test_visual_salience_deterministic_bitwise(device):
    cu = _cu(RAGGED, device)
    q, k = _inputs(int(cu[-1]), 4, 80, torch.bfloat16, device, seed=4)
    runs = [_check(q, k, cu, max(RAGGED), torch.bfloat16, deterministic=True)[0].clone() for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    atomic = _salience("triton", q, k, cu, max(RAGGED))
    assert_rel(atomic, runs[0], 1e-6, "atomic vs deterministic head reduction")


def test_visual_salience_strided_inputs(device):
    """q, k as views of a fused QKV tensor, and k from a head-major [H, T, D] cache."""
    cu = _cu(RAGGED, device)
    T, H, D = int(cu[-1]), 3, 80
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, 3, H, D, generator=g).to(device)
    q, k = qkv[:, 0], qkv[:, 1]
    assert not q.is_contiguous()
    _check(q, k, cu, max(RAGGED), torch.float32, num_summary=1)
    k_hm = torch.randn(H, T, D, generator=g).to(device).transpose(0, 1)
    _check(q, k_hm, cu, max(RAGGED), torch.float32, reduce_heads=False)


def test_visual_salience_batched_and_launcher(device):
    """4-D [B, N, H, D] through the public API, and the launcher called directly into a poisoned out."""
    B, N, H, D = 3, 20, 2, 72
    q, k = _inputs(B * N, H, D, torch.float32, device, seed=6)
    q4, k4 = q.view(B, N, H, D), k.view(B, N, H, D)
    got = _salience("triton", q4, k4, None, None)
    ref = _salience("reference", q4, k4, None, None)
    assert got.shape == (B, N)
    assert_rel(got, ref, REL_TOL[torch.float32], "batched")
    cu = _cu([N] * B, device)
    out = _poisoned(B * N, H, False, device)
    tk.visual_salience(q, k, cu, N, D ** -0.5, 0, None, False, out)
    ref_h = torch.empty_like(out)
    reference.visual_salience(q, k, cu, N, D ** -0.5, 0, None, False, ref_h)
    assert_rel(out, ref_h, REL_TOL[torch.float32], "launcher")


def test_split_head_dim():
    assert tk._split_head_dim(72) == (64, 16)
    assert tk._split_head_dim(80) == (64, 16)
    assert tk._split_head_dim(128) == (128, 0)
    assert tk._split_head_dim(96) == (64, 32)
    assert tk._split_head_dim(8) == (16, 0)


def test_default_tiles_by_head_dim_and_segment_length():
    """Narrow unmasked head dims (64, 80, 96) take 128-row LSE tiles with 4 warps and 128-key column-sum tiles up
    to 4096 tokens; 72 (a masked tail) and 128 keep the 256-wide tiles; short segments or few rows take small
    tiles whatever D."""
    def key(D, n, rows=None):
        return tk.SalienceKey("NVIDIA H200", torch.bfloat16, D, 16, 64, n, rows or n, False)

    lse = {(D, n): (c["BLOCK_M"], c["num_warps"], c["num_stages"])
           for D in (64, 72, 80, 96, 128) for n in (729, 4096) for c in [tk._lse_default(key(D, n))]}
    assert lse == {(64, 729): (128, 4, 3), (72, 729): (256, 8, 2), (80, 729): (128, 4, 3), (96, 729): (128, 4, 3),
                   (128, 729): (256, 8, 2), (64, 4096): (128, 8, 3), (72, 4096): (256, 8, 2),
                   (80, 4096): (128, 8, 3), (96, 4096): (128, 8, 3), (128, 4096): (128, 8, 3)}
    colsum = {(D, n): (c["BLOCK_N"], c["num_warps"], c["num_stages"])
              for D in (64, 72, 96, 128) for n in (729, 4096, 16384) for c in [tk._colsum_default(key(D, n))]}
    assert colsum == {(64, 729): (128, 4, 3), (64, 4096): (128, 4, 3), (64, 16384): (128, 4, 3),
                      (72, 729): (256, 8, 2), (72, 4096): (256, 8, 2), (72, 16384): (128, 4, 3),
                      (96, 729): (128, 4, 2), (96, 4096): (128, 4, 2), (96, 16384): (128, 4, 3),
                      (128, 729): (256, 8, 2), (128, 4096): (256, 8, 2), (128, 16384): (128, 4, 3)}
    assert tk._lse_default(key(80, 729, 32))["BLOCK_M"] == 32 and tk._colsum_default(key(80, 64))["BLOCK_N"] == 64


# ----------------------------------------------------------------------------------------------- GPU


def _windows(total, w):
    return [w] * (total // w) + ([total % w] if total % w else [])


@pytest.mark.gpu
@pytest.mark.parametrize("name,lengths,D", [
    ("siglip64", [729] * 64, 72),
    ("qwenvl4k", [4096], 80),
    ("qwenvl16k", [16384], 80),
    ("qwenvl_window16k", _windows(16384, 64), 80),
    ("awkward", [1, 7, 97, 729, 1025, 0, 5125], 72),
])
@pytest.mark.parametrize("c,reduce_heads", [(0, True), (0, False), (1, True)])
def test_visual_salience_gpu_shapes(name, lengths, D, c, reduce_heads):
    dev = torch.device("cuda")
    cu = _cu(lengths, dev)
    T, H = int(cu[-1]), 16
    g = torch.Generator(device=dev).manual_seed(7)
    qkv = torch.randn(T, 3, H, D, device=dev, generator=g, dtype=torch.bfloat16)
    q, k = qkv[:, 0], qkv[:, 1]  # fused-QKV views
    print(f"repro: name={name} D={D} c={c} reduce_heads={reduce_heads} seed=7")
    _check(q, k, cu, max(lengths), torch.bfloat16, num_summary=c, reduce_heads=reduce_heads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_visual_salience_gpu_lse_and_deterministic(dtype):
    dev = torch.device("cuda")
    lengths = [729] * 8 + [4096]
    cu = _cu(lengths, dev)
    T, H, D = int(cu[-1]), 16, 80
    q, k = _inputs(T, H, D, dtype, dev, seed=8)
    lse = reference.segment_lse(q, k, cu, D ** -0.5)
    _check(q, k, cu, max(lengths), dtype, lse=lse)
    runs = [_check(q, k, cu, max(lengths), dtype, deterministic=True)[0].clone() for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
