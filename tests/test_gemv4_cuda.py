"""w4a16_linear on the cuda backend (``csrc/gemv4.cu``; host side ``sparsevila_ops/cuda_gemv4.py``) against
dequantize-then-matmul in float64, with the accuracy rule of test_gemv4 (the output's rounding). Outputs are
poisoned first.

CPU: the support rules, the backend preference (no Triton import by the host code: test_decode_cuda).
GPU (`gpu`, where the cuda backend runs): every config of the tuning space on one awkward shape, batches 1-16
(one and two MMA row tiles), groups 128 / 256 / 640, bias, strided x rows, fp16 and bf16, N not a multiple of a
CTA's rows, more warps than blocks of 128, bitwise repeatability, CUDA-graph replay, the Triton fallback for N not
a multiple of 8, and the op's default routing.
"""
from __future__ import annotations

import pytest
import torch

import sparsevila_ops as so
from helpers import poison, rel_err
from sparsevila_ops import _backend, _cuda, autotune
from sparsevila_ops import quant as Q
from test_gemv4 import GLU_TOL, TOL, _gen, _oracle, _weight

HAS_CUDA_BACKEND = torch.cuda.is_available() and _cuda.unusable(torch.device("cuda")) is None
needs_cuda = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="the cuda backend cannot run here")


def test_support_rules():
    from sparsevila_ops.cuda_gemv4 import unsupported
    _, w4 = _weight(16, 256, torch.bfloat16, "cpu")
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    assert unsupported(x, w4.qweight, w4.scales, w4.zeros) is None
    assert "dtype" in unsupported(x.float(), w4.qweight, w4.scales, w4.zeros)
    assert "rows of x" in unsupported(torch.zeros(17, 256, dtype=torch.bfloat16), w4.qweight, w4.scales, w4.zeros)
    _, w12 = _weight(12, 256, torch.bfloat16, "cpu")
    assert "multiple of 8" in unsupported(x, w12.qweight, w12.scales, w12.zeros)
    assert unsupported(x, w4.qweight, w4.scales, w4.zeros, True) is None  # W [16, K]: 8 outputs
    assert "N = 6 not a multiple of 8" in unsupported(x, w12.qweight, w12.scales, w12.zeros, True)
    wide = torch.zeros(3, 268, dtype=torch.bfloat16)[:, 4:260]  # rows 8 bytes off, stride 268
    assert "x not" in unsupported(wide, w4.qweight, w4.scales, w4.zeros)
    assert unsupported(torch.zeros(3, 272, dtype=torch.bfloat16)[:, 8:264], w4.qweight, w4.scales, w4.zeros) is None
    assert "contiguous" in unsupported(x, w4.qweight, w4.scales.t().contiguous().t(), w4.zeros)
    from sparsevila_ops.cuda_gemv4 import _outputs_unsupported
    assert _outputs_unsupported(None, torch.zeros(3, 16)) is None
    assert "contiguous" in _outputs_unsupported(None, torch.zeros(16, 3).t())


def test_preference_and_registration_on_the_cpu():
    assert "cuda" in _backend._REGISTRY["w4a16_linear"]
    _, w4 = _weight(16, 256, torch.bfloat16, "cpu")
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert Q._preferred_backend(torch.device("cpu"), x, w4.qweight, w4.scales, w4.zeros) is None
    assert autotune.kernel("w4a16_linear", "cuda").op == "w4a16_linear"


def _launch(x, w4, bias, cfg, glu=False):
    from sparsevila_ops import cuda_gemv4
    N = w4.out_features // 2 if glu else w4.out_features
    out = poison(torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device))
    cuda_gemv4._launch(x, w4.qweight, w4.scales, w4.zeros, bias, glu, out, cfg)
    return out


@pytest.mark.gpu
@needs_cuda
def test_every_config_of_the_space():
    """N = 40 (5 tiles of 8: not a multiple of a CTA's rows), K = 5 blocks (fewer than most warp counts), M 5."""
    N, K, M = 40, 640, 5
    _, w4 = _weight(N, K, torch.bfloat16, "cuda", seed=1)
    x = torch.randn(M, K, generator=_gen(2)).to("cuda", torch.bfloat16)
    bias = torch.randn(N, generator=_gen(3)).to("cuda", torch.bfloat16)
    ref = _oracle(x, w4, bias)
    space = autotune.config_space("w4a16_linear", x, w4.qweight, w4.scales, w4.zeros, bias, False,
                                  x.new_empty(M, N), backend="cuda")
    assert len(space) >= 40 and {c["aw"] for c in space} == {0, 1}
    for cfg in space:
        assert rel_err(_launch(x, w4, bias, cfg), ref) <= TOL[torch.bfloat16], cfg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 3, 12])
def test_glu_every_config_of_the_space(M):
    """glu: W [2 x 40, K] (5 output tiles of 8: gate and up tiles of a warp straddle the CTA's end), K = 5 blocks,
    bias [80]; out [M, 40] = silu(gate) * up with the contract's roundings, for every tuning config."""
    N, K = 40, 640
    _, w4 = _weight(2 * N, K, torch.bfloat16, "cuda", seed=11 + M)
    x = torch.randn(M, K, generator=_gen(12 + M)).to("cuda", torch.bfloat16)
    bias = torch.randn(2 * N, generator=_gen(13)).to("cuda", torch.bfloat16)
    ref = _oracle(x, w4, bias, glu=True)
    space = autotune.config_space("w4a16_linear", x, w4.qweight, w4.scales, w4.zeros, bias, True,
                                  x.new_empty(M, N), backend="cuda")
    assert len(space) >= 30 and all(c["tiles"] >= 2 for c in space)
    for cfg in space:
        assert rel_err(_launch(x, w4, bias, cfg, glu=True), ref) <= GLU_TOL[torch.bfloat16], cfg
    y = _launch(x, w4, bias, space[0], glu=True)
    with so.use_backend("reference"):  # the reference's roundings, bit for bit but for the fp32 sums' order
        r = Q.w4a16_linear(x.cpu(), Q.W4Weight(w4.qweight.cpu(), w4.scales.cpu(), w4.zeros.cpu(), 128),
                           bias.cpu(), glu=True)
    assert rel_err(y, r.double()) <= GLU_TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("M,N,K,group", [(1, 4608, 3584, 128), (3, 1032, 384, 128), (8, 520, 1280, 256),
                                         (9, 264, 640, 640), (16, 2048, 1024, 128), (1, 8, 128, 128)])
def test_shapes_batches_groups(dtype, M, N, K, group):
    _, w4 = _weight(N, K, dtype, "cuda", seed=M + N, group_size=group)
    wide = torch.randn(M, K + 24, generator=_gen(M)).to("cuda", dtype)
    x = wide[:, 8:K + 8]  # rows strided, 16-byte aligned
    bias = torch.randn(N, generator=_gen(N)).to("cuda", dtype) if M % 2 else None
    cfgs = [{"tiles": 1, "warps": 8, "kwarps": 8, "stages": 4, "aw": 0},
            {"tiles": 4, "warps": 6, "kwarps": 3, "stages": 2, "aw": 0},
            {"tiles": 2, "warps": 3, "kwarps": 1, "stages": 8, "aw": 0}]
    if M <= 8:  # the weights as the MMA's A operand
        cfgs += [{"tiles": 4, "warps": 6, "kwarps": 3, "stages": 2, "aw": 1},
                 {"tiles": 2, "warps": 3, "kwarps": 1, "stages": 8, "aw": 1}]
    for cfg in cfgs:
        assert rel_err(_launch(x, w4, bias, cfg), _oracle(x, w4, bias)) <= TOL[dtype], cfg


@pytest.mark.gpu
@needs_cuda
def test_op_routes_to_cuda_repeatable_and_in_a_graph():
    """The op picks the cuda backend by default for covered inputs; results are bitwise repeatable and a CUDA
    graph replays the eager bits; N not a multiple of 8 runs the Triton kernel, still correct."""
    _, w4 = _weight(3584, 3584, torch.bfloat16, "cuda", seed=7)
    x = torch.randn(2, 3584, generator=_gen(8)).to("cuda", torch.bfloat16)
    assert _backend.resolve("w4a16_linear", x.device, (x, w4.qweight, w4.scales, w4.zeros)).__module__ \
        == "sparsevila_ops.cuda_gemv4"
    y = Q.w4a16_linear(x, w4)
    assert rel_err(y, _oracle(x, w4)) <= TOL[torch.bfloat16]
    assert all(torch.equal(Q.w4a16_linear(x, w4), y) for _ in range(3))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = Q.w4a16_linear(x, w4)
    poison(out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
    _, w12 = _weight(12, 256, torch.bfloat16, "cuda", seed=9)
    x12 = torch.randn(3, 256, generator=_gen(10)).to("cuda", torch.bfloat16)
    assert rel_err(Q.w4a16_linear(x12, w12), _oracle(x12, w12)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("M", [1, 8, 16])
def test_default_is_in_the_space_and_fits(M):
    """For the Qwen2.5-7B GEMVs and other sizes: the default config is one of the declared space's, every config
    of the space fits the shared-memory limit, and kwarps divides warps (what the launcher requires)."""
    from sparsevila_ops import cuda_gemv4 as C
    for N, K in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (8, 128), (1032, 384)):
        for glu in (False, True):
            key = C.W4CudaKey("gpu", torch.bfloat16, M, N, K, 128, glu, 132)
            space = C._space(key)
            assert C._default(key) in space and (not glu or C._default(key)["tiles"] >= 2)
            assert all(C._resources(key, c)[0] <= C.SMEM_LIMIT and c["warps"] % c["kwarps"] == 0 for c in space)
            assert all(c["tiles"] >= 2 and M <= 8 for c in space if c["aw"])  # what the launcher requires
            d = C._default(key)
            assert d["aw"] == int(d["tiles"] >= 2 and M <= 8)  # the weights are A wherever they can be


def test_default_warps_per_cta():
    """8 warps per CTA, 4 where 4 already give >= 24 warps per SM (Qwen2.5-7B's gate/up: 1184 CTAs of 4 tiles)."""
    from sparsevila_ops import cuda_gemv4 as C
    key = lambda M, N, K, glu=False: C.W4CudaKey("gpu", torch.bfloat16, M, N, K, 128, glu, 132)  # noqa: E731
    assert C._default(key(1, 18944, 3584, True)) == {"tiles": 4, "warps": 4, "kwarps": 4, "stages": 2, "aw": 1}
    assert C._default(key(8, 37888, 3584))["warps"] == 4
    for N, K in ((4608, 3584), (3584, 3584), (3584, 18944), (22016, 4096), (1536, 8960)):
        assert C._default(key(1, N, K))["warps"] == 8, (N, K)
