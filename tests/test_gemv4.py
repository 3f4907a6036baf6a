"""W4A16 (``sparsevila_ops.quant``, ``triton_kernels/gemv4.py``): the Triton GEMV/GEMM (interpreter on the CPU)
and the reference backend against dequantize-then-matmul in float64, the packing contract, the quantization
error bound, the modules, and validation. Outputs are poisoned first."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsevila_ops as so
from helpers import poison, rel_err
from sparsevila_ops import quant as Q

# Unit roundoff of the output dtype: the kernel's own error (fp32 sums) is ~1e-5, so the output's rounding
# to nearest bounds the relative error; 1e-4 of margin.
TOL = {torch.bfloat16: 2.0 ** -8 + 1e-4, torch.float16: 2.0 ** -11 + 1e-4}
GLU_TOL = {dt: 3 * t for dt, t in TOL.items()}  # glu rounds three times (gate and up, silu, product: the contract)
DTYPES = (torch.bfloat16, torch.float16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _weight(N, K, dtype, device, seed=0, group_size=128):
    w = (torch.randn(N, K, generator=_gen(seed)) * 0.05).to(dtype)
    return w, Q.quantize_w4(w.to(device), group_size)


def _oracle(x, w4, bias=None, glu=False):
    """float64 x W^T (+ bias); glu: silu(gate) * up of its halves, in float64 from the gate and up rounded to x's
    dtype (what a correct kernel's last rounding starts from)."""
    y = x.double().cpu() @ Q.dequantize_w4(w4, torch.float64).cpu().t()
    y = y if bias is None else y + bias.double().cpu()
    if not glu:
        return y
    gate, up = y.to(x.dtype).chunk(2, dim=1)
    return torch.nn.functional.silu(gate).double() * up.double()


def _kernel():
    from sparsevila_ops.triton_kernels import gemv4
    return gemv4


CONFIGS = [{"BLOCK_N": 16, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
           {"BLOCK_N": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 3},  # 3 splits of 4 blocks: one empty
           {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 4}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_kernel_matches_float64_dequant_matmul(device, dtype, M, cfg):
    """N odd (not a multiple of any BLOCK_N), K = 3 blocks of 128 (uneven over splits), bias with splits."""
    N, K = 37, 384
    _, w4 = _weight(N, K, dtype, device, seed=M)
    x = torch.randn(M, K, generator=_gen(10 + M)).to(device, dtype)
    bias = torch.randn(N, generator=_gen(20)).to(device, dtype) if cfg != 0 else None
    out = poison(torch.empty(M, N, dtype=dtype, device=device))
    _kernel().launch(x, w4.qweight, w4.scales, w4.zeros, bias, False, out, CONFIGS[cfg])
    assert rel_err(out, _oracle(x, w4, bias)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5])
def test_kernel_glu_matches_float64(device, dtype, M):
    """glu: W [2 x 19, K] (gate rows, then up rows), bias [38]; out [M, 19] = silu(gate) * up, rounded as the
    unfused path."""
    N, K = 19, 384
    _, w4 = _weight(2 * N, K, dtype, device, seed=30 + M)
    x = torch.randn(M, K, generator=_gen(31 + M)).to(device, dtype)
    bias = torch.randn(2 * N, generator=_gen(32)).to(device, dtype)
    out = poison(torch.empty(M, N, dtype=dtype, device=device))
    _kernel().launch(x, w4.qweight, w4.scales, w4.zeros, bias, True, out, CONFIGS[1])
    assert rel_err(out, _oracle(x, w4, bias, glu=True)) <= GLU_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_256_and_more_blocks_than_splits(device, dtype):
    N, K, M = 19, 1024, 3
    _, w4 = _weight(N, K, dtype, device, seed=3, group_size=256)
    assert tuple(w4.scales.shape) == (4, N)
    x = torch.randn(M, K, generator=_gen(4)).to(device, dtype)
    out = poison(torch.empty(M, N, dtype=dtype, device=device))
    _kernel().launch(x, w4.qweight, w4.scales, w4.zeros, None, False, out,
                     {"BLOCK_N": 16, "SPLIT_K": 3, "num_warps": 4, "num_stages": 2})
    assert rel_err(out, _oracle(x, w4)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_function_on_triton_strided_rows_3d_and_bias(device, dtype):
    """x rows with a stride (a column slice of a wider tensor) and a 3-D x, through the op and the heuristic."""
    N, K = 45, 256
    _, w4 = _weight(N, K, dtype, device, seed=5)
    wide = torch.randn(6, K + 96, generator=_gen(6)).to(device, dtype)
    x = wide[:, 32:32 + K]
    assert x.stride(0) == K + 96
    bias = torch.randn(N, generator=_gen(7)).to(device, dtype)
    with so.use_backend("triton"):
        y = Q.w4a16_linear(x, w4, bias)
        y3 = Q.w4a16_linear(x.reshape(2, 3, K), w4)
    assert y.dtype == dtype and y.shape == (6, N) and y3.shape == (2, 3, N)
    assert rel_err(y, _oracle(x, w4, bias)) <= TOL[dtype]
    assert rel_err(y3.reshape(6, N), _oracle(x, w4)) <= TOL[dtype]


def test_config_heuristic_splits_to_twelve_programs_per_sm():
    from sparsevila_ops.autotune import kernel
    default, W4Key = kernel("w4a16_linear").default, _kernel().W4Key
    cfg = lambda M, N, K, sms: default(W4Key("NVIDIA H100", torch.bfloat16, M, N, K, 128, sms))  # noqa: E731
    assert cfg(1, 37888, 3584, 132)["SPLIT_K"] == 4  # gate_up: 296 tiles of 128, 1184 programs
    assert cfg(1, 3584, 3584, 132)["SPLIT_K"] == 8  # o: 28 blocks of K, 3.5 per split
    assert cfg(8, 3584, 18944, 132)["SPLIT_K"] == 16  # down
    assert cfg(1, 37, 384, 132)["SPLIT_K"] == 1  # 3 blocks: too few to split
    for M, N, K in ((1, 4608, 3584), (8, 3584, 18944), (4, 100, 1280)):
        c = cfg(M, N, K, 132)
        assert K // 128 >= 3 * c["SPLIT_K"] or c["SPLIT_K"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend_and_many_rows(dtype):
    """CPU default (reference: dequantize to fp32, fp32 matmul) and the > 16-row path (dequantize + F.linear)."""
    N, K = 21, 256
    _, w4 = _weight(N, K, dtype, "cpu", seed=8)
    bias = torch.randn(N, generator=_gen(9)).to(dtype)
    for M in (1, 16, 17, 40):
        x = torch.randn(M, K, generator=_gen(M)).to(dtype)
        with so.use_backend("reference"):
            y = Q.w4a16_linear(x, w4, bias)
        # > 16 rows: W is dequantized to x's dtype first (one more rounding per weight)
        tol = TOL[dtype] if M <= Q.MAX_KERNEL_ROWS else 4 * TOL[dtype]
        assert rel_err(y, _oracle(x, w4, bias)) <= tol, M
    assert Q.w4a16_linear(torch.empty(0, K, dtype=dtype), w4).shape == (0, N)


@pytest.mark.parametrize("M", [3, 17])
def test_glu_equals_the_unfused_path(M):
    """glu=True (reference backend at <= 16 rows, dequantize + F.linear above) is bit for bit
    ``F.silu(gate) * up`` of the unfused output's halves, within the rule of the float64 oracle."""
    N, K = 24, 256
    _, w4 = _weight(2 * N, K, torch.bfloat16, "cpu", seed=40)
    bias = torch.randn(2 * N, generator=_gen(41)).to(torch.bfloat16)
    x = torch.randn(M, K, generator=_gen(42)).to(torch.bfloat16)
    with so.use_backend("reference"):
        y, full = Q.w4a16_linear(x, w4, bias, glu=True), Q.w4a16_linear(x, w4, bias)
    assert y.shape == (M, N)
    assert torch.equal(y, torch.nn.functional.silu(full[:, :N]) * full[:, N:])
    if M <= Q.MAX_KERNEL_ROWS:
        assert rel_err(y, _oracle(x, w4, bias, glu=True)) <= GLU_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_round_trip_error_bound(dtype):
    """|w - (q - z) s| <= s / 2 for every weight, including constant, all-zero and one-signed groups."""
    N, K, G = 6, 512, 128
    w = torch.randn(N, K, generator=_gen(11)) * 0.1
    w[0, :G] = 0.0
    w[1, :G] = 0.37
    w[2, G:2 * G] = -2.5
    w[3, :G] = w[3, :G].abs() + 1.0
    w[4] *= 300.0
    w = w.to(dtype)
    w4 = Q.quantize_w4(w, G)
    deq = Q.dequantize_w4(w4, torch.float64)
    s = w4.scales.double().t().repeat_interleave(G, dim=1)
    err = (deq - w.double()).abs()
    assert bool((err <= 0.5 * s * (1 + 1e-5) + 1e-30).all()), float((err / s).max())
    assert torch.equal(deq[0, :G], torch.zeros(G, dtype=torch.float64))
    assert torch.allclose(deq[1, :G], w[1, :G].double(), rtol=1e-2)  # a constant group is (nearly) exact
    assert Q.dequantize_w4(w4).dtype == dtype and w4.nbytes == N * K // 2 + (K // G) * N * 3
    assert int(w4.zeros.max()) <= 15


def test_packing_layout_is_the_documented_one():
    """Word i of block b holds q[n, 128 b + 16 j + i] in bits [4j, 4j + 4), with q = round(W / s) + z."""
    N, K = 3, 256
    w, w4 = _weight(N, K, torch.float16, "cpu", seed=12)
    q = torch.empty(N, K, dtype=torch.int64)
    words = w4.qweight.to(torch.int64) & 0xFFFFFFFF
    for b in range(K // 128):
        for j in range(8):
            for i in range(16):
                q[:, 128 * b + 16 * j + i] = (words[:, 16 * b + i] >> (4 * j)) & 0xF
    s = w4.scales.double().t().repeat_interleave(128, dim=1)
    z = w4.zeros.double().t().repeat_interleave(128, dim=1)
    assert torch.equal(Q.dequantize_w4(w4, torch.float64), (q.double() - z) * s)
    assert (q.double() - z - w.double() / s).abs().max() <= 0.5 + 1e-4


def test_opcheck_and_compile_fullgraph():
    N, K = 20, 256
    _, w4 = _weight(N, K, torch.bfloat16, "cpu", seed=13)
    x = torch.randn(3, K, generator=_gen(14)).to(torch.bfloat16)
    bias = torch.randn(N, generator=_gen(15)).to(torch.bfloat16)
    op = torch.ops.sparsevila_quant.w4a16_linear
    with so.use_backend("reference"):
        for b in (None, bias):
            torch.library.opcheck(op, (x, w4.qweight, w4.scales, w4.zeros, b, False,
                                       poison(torch.empty(3, N, dtype=torch.bfloat16))))
        torch.library.opcheck(op, (x, w4.qweight, w4.scales, w4.zeros, bias, True,
                                   poison(torch.empty(3, N // 2, dtype=torch.bfloat16))))
        fn = torch.compile(lambda x: Q.w4a16_linear(x, w4, bias), fullgraph=True, backend="aot_eager")
        assert torch.equal(fn(x), Q.w4a16_linear(x, w4, bias))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 37, bias=True)
        self.mlp = nn.Sequential(nn.Linear(256, 128, bias=False), nn.GELU())
        self.lm_head = nn.Linear(128, 10)
        self.odd = nn.Linear(100, 5)


def test_quantize_model_linears_swaps_and_skips():
    m = _Block().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"odd: in_features \(100\) must be a multiple of group_size \(128\)"):
        Q.quantize_model_linears(m)
    assert isinstance(m.proj, nn.Linear)  # nothing replaced when one layer is refused
    ref_w = m.proj.weight.detach().clone()
    Q.quantize_model_linears(m, skip=("lm_head", "odd"))
    assert isinstance(m.proj, Q.W4Linear) and isinstance(m.mlp[0], Q.W4Linear)
    assert type(m.lm_head) is nn.Linear and type(m.odd) is nn.Linear
    assert m.proj.bias.dtype == torch.bfloat16 and m.mlp[0].bias is None
    assert "group_size=128" in repr(m.proj)
    x = torch.randn(2, 256, generator=_gen(16)).to(torch.bfloat16)
    w4 = Q.quantize_w4(ref_w)
    assert torch.equal(m.proj(x), Q.w4a16_linear(x, w4, m.proj.bias))
    assert rel_err(m.proj(x), x.double() @ ref_w.double().t() + m.proj.bias.double()) < 0.1
    with pytest.raises(TypeError, match="weight must be fp16/bf16"):
        Q.quantize_model_linears(_Block(), skip=("odd",))
    with pytest.raises(TypeError, match="skip must be a sequence"):
        Q.quantize_model_linears(m, skip="lm_head")


def test_bad_inputs_name_the_argument_and_rule():
    w = torch.randn(8, 256).to(torch.bfloat16)
    w4 = Q.quantize_w4(w)
    x = torch.randn(2, 256).to(torch.bfloat16)
    cases = [
        (lambda: Q.quantize_w4(torch.randn(8, 200).half()), ValueError, r"K = 200\) must be a multiple of group_size"),
        (lambda: Q.quantize_w4(w, 64), ValueError, "group_size must be >= 128"),
        (lambda: Q.quantize_w4(torch.randn(8, 384).half(), 192), ValueError, "group_size must be a multiple of 128"),
        (lambda: Q.quantize_w4(w, 128.0), TypeError, "group_size must be a Python int"),
        (lambda: Q.quantize_w4(w.float()), TypeError, "weight must have dtype in"),
        (lambda: Q.quantize_w4(w[0]), ValueError, "weight must have 2 dims"),
        (lambda: Q.w4a16_linear(x, w), TypeError, "w4 must be a W4Weight"),
        (lambda: Q.w4a16_linear(x.half(), w4), TypeError, r"x must have the dtype of w4.scales"),
        (lambda: Q.w4a16_linear(x.float(), w4), TypeError, "x must have dtype in"),
        (lambda: Q.w4a16_linear(x[:, :128], w4), ValueError, r"x must be \[..., K\] with K = w4.in_features = 256"),
        (lambda: Q.w4a16_linear(torch.randn(256, 2).to(torch.bfloat16).t(), w4), ValueError,
         "x must be contiguous in its last dim"),
        (lambda: Q.w4a16_linear(x, w4, torch.zeros(7, dtype=torch.bfloat16)), ValueError,
         r"bias must be \[N\] = \[8\]"),
        (lambda: Q.w4a16_linear(x, w4, torch.zeros(8)), TypeError, "bias must have dtype in"),
        (lambda: Q.w4a16_linear(x, w4, glu=1), TypeError, "glu must be a bool"),
        (lambda: Q.w4a16_linear(x, Q.quantize_w4(torch.randn(6, 256).to(torch.bfloat16)[:5]), glu=True), ValueError,
         r"w4 must be \[2N, K\] \(gate rows, then up rows\) with glu; got 5 rows"),
        (lambda: Q.W4Weight(w4.qweight, w4.scales.t().contiguous(), w4.zeros, 128), ValueError,
         r"scales must be \[K/group_size, N\] = \[2, 8\]"),
        (lambda: Q.W4Weight(w4.qweight.float(), w4.scales, w4.zeros, 128), TypeError, "qweight must have dtype in"),
        (lambda: Q.W4Weight(w4.qweight, w4.scales, w4.zeros.to(torch.int32), 128), TypeError,
         "zeros must have dtype in"),
        (lambda: Q.W4Weight(w4.qweight, w4.scales.t().contiguous().t(), w4.zeros, 128), ValueError,
         "scales must be contiguous"),
        (lambda: Q.W4Weight(torch.zeros(8, 48, dtype=torch.int32), w4.scales, w4.zeros, 256), ValueError,
         "K a multiple of group_size"),
        (lambda: Q.dequantize_w4(w), TypeError, "w4 must be a W4Weight"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_bf16_path_does_not_import_quant():
    """4-bit is an extra: importing the package and the integrations leaves sparsevila_ops.quant unloaded."""
    import subprocess
    import sys
    code = ("import sys, sparsevila_ops, sparsevila_ops.integrations, sparsevila_ops.integrations.demo; "
            "sys.exit('sparsevila_ops.quant' in sys.modules or 'sparsevila_ops.triton_kernels.gemv4' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_bench_without_a_gpu_skips_with_one_line(capsys):
    from bench import gemv4
    assert gemv4.main(["--quick"]) == 0 and gemv4.main(["--sweep"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["bench.gemv4: needs a CUDA GPU; skipped"] * 2
    with pytest.raises(SystemExit):
        gemv4.main(["--batches", "17"])
    assert "--batches must lie in [1, 16]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gemv4.main(["--methods", "cuda", "marlin"])
    assert "invalid choice: 'marlin'" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_rounds_time_the_layer_beside_its_parts():
    """``--batches 1 1 --methods cuda``: two rounds of every row, only the cuda method, each layer row with the sum
    of its GEMVs timed alone in the same round."""
    from bench import gemv4
    rows, notes, _ = gemv4.run([1, 1], iters=3, methods=("cuda",))
    assert len(rows) == 2 * (len(gemv4.SHAPES) + len(gemv4.LAYERS))
    for rnd in (rows[:len(rows) // 2], rows[len(rows) // 2:]):
        alone = {r["op"]: r["cuda_us"] for r in rnd if r["op"] in gemv4.SHAPES}
        for r in rnd:
            assert not any(k.endswith("_us") and not k.startswith(("cuda", "floor")) for k in r)
            if r["op"] in gemv4.LAYERS:
                assert r["cuda_parts_us"] == pytest.approx(sum(alone[n] for n in gemv4.LAYERS[r["op"]]))
                assert r["cuda_layer_over_parts"] == pytest.approx(r["cuda_us"] / r["cuda_parts_us"])


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)])
def test_qwen_shapes_on_the_gpu_and_in_a_cuda_graph(N, K):
    """Qwen2.5-7B's qkv / o / gate_up / down at decode batches 1, 3, 8 (heuristic configs, split-K where it
    chooses it) against float64, then the same calls captured in one CUDA graph give the eager bits."""
    _, w4 = _weight(N, K, torch.bfloat16, "cuda", seed=N + K)
    xs = [torch.randn(M, K, generator=_gen(M)).to("cuda", torch.bfloat16) for M in (1, 3, 8)]
    w64 = Q.dequantize_w4(w4, torch.float64)
    eager = [Q.w4a16_linear(x, w4) for x in xs]
    for x, y in zip(xs, eager):
        assert rel_err(y, x.double() @ w64.t()) <= TOL[torch.bfloat16]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [Q.w4a16_linear(x, w4) for x in xs]
    for o in outs:
        poison(o)
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, y) for o, y in zip(outs, eager))


# --- the autotune seam ------------------------------------------------------------------------------------------------

QWEN_GEMVS = ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944))  # N, K: qkv, o, gate_up, down


def _sweep(N, K):
    """The configs ``bench/gemv4.py --sweep`` times, in its order."""
    return [{"BLOCK_N": bn, "SPLIT_K": s, "num_warps": w, "num_stages": st} for bn in (32, 64, 128)
            for s in (1, 2, 4, 8, 16) if K // 128 >= 2 * s for w in (4, 8) for st in (3, 5)]


def _meta_args(M, N, K, group=128, dtype=torch.bfloat16):
    """The launcher's arguments as meta tensors (shapes only: keys and defaults at real sizes, no memory)."""
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    return (e(M, K), e(N, K // 8, dt=torch.int32), e(K // group, N), e(K // group, N, dt=torch.uint8), None, False,
            e(M, N))


def test_default_config_rule_on_a_grid():
    """The Tunable's default: 128-row tiles (64 for N <= 2048), 4 warps, 3 stages, and the largest power-of-two K
    split up to 16 that keeps >= 3 blocks of 128 per split and <= 12 programs per SM (1 where none does); in the
    space. Qwen2.5-7B on 132 SMs: qkv and o split 8, gate_up 4, down 16."""
    from sparsevila_ops.autotune import kernel
    t, W4Key = kernel("w4a16_linear"), _kernel().W4Key
    grid = [(M, N, K, sms) for N, K in QWEN_GEMVS for M in range(1, 9) for sms in (4, 78, 108, 114, 132, 144)]
    grid += [(M, N, K, sms) for M in (1, 3, 16) for N in (1, 16, 37, 64, 100, 512, 2048, 4096, 11008, 22016, 65536)
             for K in (128, 256, 384, 1024, 1280, 4096, 11008, 18944, 65536) for sms in (1, 4, 16, 132)]
    for M, N, K, sms in grid:
        for dtype, group in ((torch.bfloat16, 128), (torch.float16, 128), (torch.bfloat16, 1 << (K.bit_length() - 1))):
            key = W4Key("NVIDIA H200", dtype, M, N, K, group, sms)
            cfg = t.default(key)
            bn, split = cfg["BLOCK_N"], cfg["SPLIT_K"]
            assert (bn, cfg["num_warps"], cfg["num_stages"]) == (128 if N > 2048 else 64, 4, 3), key
            fits = lambda s: s == 1 or (K // 128 >= 3 * s and -(-N // bn) * s <= 12 * sms)  # noqa: E731
            assert split in (1, 2, 4, 8, 16) and fits(split) and (split == 16 or not fits(2 * split)), key
            if K // 128 >= 2:
                assert cfg in t.space(key), key
    assert len(grid) == 4 * 8 * 6 + 3 * 11 * 9 * 4
    splits = [t.default(W4Key("NVIDIA H200", torch.bfloat16, 1, N, K, 128, 132))["SPLIT_K"] for N, K in QWEN_GEMVS]
    assert splits == [8, 8, 4, 16]


def test_key_space_and_lookup_of_a_call_at_qwen_shapes():
    """From the launcher's arguments: the key (gpu, dtype, M, N, K, group size, SMs), its table key (M, N, K
    rounded down to powers of two), the default and the space (the sweep's configs after the default); with no
    table, the lookup is the default."""
    from sparsevila_ops import autotune
    t, W4Key = autotune.kernel("w4a16_linear"), _kernel().W4Key
    for N, K in QWEN_GEMVS:
        for M in range(1, 9):
            args = _meta_args(M, N, K)
            key = t.key(*args)
            assert key == W4Key("cpu", torch.bfloat16, M, N, K, 128, 4)
            default = {"BLOCK_N": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}  # 4 SMs: no split fits
            assert autotune.default_config("w4a16_linear", *args) == default
            space = autotune.config_space("w4a16_linear", *args)
            assert space == [default] + [c for c in _sweep(N, K) if c != default]
            assert autotune.lookup("w4a16_linear", *args) == (space[0], autotune.DEFAULT)
    assert t.table_key(t.key(*_meta_args(5, 4608, 3584, group=256))) == \
        "dtype=bfloat16,M=4,N=4096,K=2048,group=256,sms=4"
    assert t.space(W4Key("x", torch.bfloat16, 1, 3584, 18944, 128, 132)) == _sweep(3584, 18944)


def test_problem_reference_is_dequantize_then_matmul():
    """``autotune.make_args`` builds a valid 4-bit weight; the tuner's reference is the float64 oracle rounded."""
    from sparsevila_ops.autotune import make_args
    from sparsevila_ops.autotune.problems import problem_of
    for glu in (False, True):
        x, qw, s, z, bias, g, out = make_args(
            "w4a16_linear", {"M": 3, "N": 24, "K": 512, "group": 256, "glu": glu, "bias": True}, "cpu")
        w4 = Q.W4Weight(qw, s, z, 256)
        rows = 48 if glu else 24
        assert x.shape == (3, 512) and out.shape == (3, 24) and bias.shape == (rows,) and qw.shape == (rows, 64)
        assert g is glu and x.dtype == s.dtype == torch.bfloat16
        assert (out == 0).all() and int(z.max()) <= 15 and bool((s > 0).all())
        problem_of("w4a16_linear").reference(x, qw, s, z, bias, glu, out)
        assert rel_err(out, _oracle(x, w4, bias, glu)) <= (GLU_TOL if glu else TOL)[torch.bfloat16]
    with pytest.raises(ValueError, match="group must be a multiple of 128 dividing K"):
        make_args("w4a16_linear", {"K": 384, "group": 256}, "cpu")


def test_bench_sweep_measures_the_declared_space(capsys):
    """``bench/gemv4.py --sweep`` times exactly the declared candidates (the default first, flagged), each verified
    (here under the interpreter, with a fake timer)."""
    from bench import gemv4 as bench
    from sparsevila_ops import autotune
    rows = bench.sweep([2], 1, shapes={"tiny": (24, 512)}, device="cpu", timer=lambda run, n: run(0) or 0.5)
    space = autotune.config_space("w4a16_linear", *autotune.make_args("w4a16_linear", {"M": 2, "N": 24, "K": 512},
                                                                      "cpu"))
    assert [{k: r[k] for k in space[0]} for r in rows] == space and len(space) == 3 * 2 * 2 * 2  # the default first
    assert [r["heuristic"] for r in rows] == [True] + [False] * (len(space) - 1)
    assert all(r["op"] == "tiny" and r["M"] == 2 and r["us"] == 500.0 for r in rows)
    assert "skip" not in capsys.readouterr().out


def test_bench_sweep_of_the_dense_gemv(capsys):
    """``bench/gemv4.py --sweep --op gemv`` times the dense GEMV's declared space (here its Triton kernel under the
    interpreter, a glu shape, a fake timer), each config verified, the default first."""
    from bench import gemv4 as bench
    from sparsevila_ops import autotune
    rows = bench.sweep([1], 1, shapes={"tiny": (24, 64, True)}, device="cpu", timer=lambda run, n: run(0) or 0.25,
                       op="gemv")
    space = autotune.config_space("gemv", *autotune.make_args("gemv", {"M": 1, "N": 24, "K": 64, "glu": True}, "cpu"))
    assert [{k: r[k] for k in space[0]} for r in rows] == space
    assert [r["heuristic"] for r in rows] == [True] + [False] * (len(space) - 1)
    assert all(r["op"] == "tiny" and r["glu"] and r["us"] == 250.0 for r in rows)
    assert "skip" not in capsys.readouterr().out
