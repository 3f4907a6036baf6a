"""gemv (``sparsevila_ops.linear``; ``triton_kernels/gemv.py``, ``csrc/gemv.cu`` with ``cuda_gemv.py``) against a
float64 matmul (glu: then ``F.silu(gate) * up`` of its halves rounded to x's dtype, the op's contract), with the
accuracy rule of the output's rounding. Outputs are poisoned first.

CPU: the reference and the Triton kernel (interpreter), the folds (RMSNorm, residual) composed around it,
validation, the cuda kernel's support rules and configs. GPU (`gpu`, where the cuda backend runs): every config of
the cuda space on awkward shapes, batches 1-8, strided and unaligned rows (the Triton fallback), fp16/bf16, bias,
glu, the folds in the kernel at one row of x, bitwise repeatability, CUDA-graph replay, and the op's default
routing.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsevila_ops as so
from helpers import poison, rel_err
from sparsevila_ops import _backend, _cuda, autotune

# Unit roundoff of the output dtype (the fp32 sums' own error is far below); glu rounds three times (gate, silu,
# product: the contract), each within one unit of the float64 value.
TOL = {torch.bfloat16: 2.0 ** -8 + 2e-4, torch.float16: 2.0 ** -11 + 2e-4}
GLU_TOL = {dt: 3 * t for dt, t in TOL.items()}
DTYPES = (torch.bfloat16, torch.float16)
HAS_CUDA_BACKEND = torch.cuda.is_available() and _cuda.unusable(torch.device("cuda")) is None
needs_cuda = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="the cuda backend cannot run here")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _inputs(M, N, K, dtype, device, glu=False, bias=True, pad=0, seed=0):
    """x [M, K] as a view with `pad` extra columns per row, weight [N, K] (glu: [2N, K]) * 0.05, bias."""
    rows = 2 * N if glu else N
    x = torch.randn(M, K + pad, generator=_gen(seed)).to(device, dtype)[:, pad:]
    w = (torch.randn(rows, K, generator=_gen(seed + 1)) * 0.05).to(device, dtype)
    b = torch.randn(rows, generator=_gen(seed + 2)).to(device, dtype) if bias else None
    return x, w, b


def _oracle(x, w, b, glu, dtype=None):
    """float64 x W^T + b; glu: silu(gate) * up of its halves, the product in float64 of the gate and up rounded
    to ``dtype`` (default x's; what a correct kernel's last rounding starts from)."""
    y = x.double().cpu() @ w.double().cpu().t()
    if b is not None:
        y = y + b.double().cpu()
    if not glu:
        return y
    gate, up = y.to(dtype or x.dtype).chunk(2, dim=1)
    return F.silu(gate).double() * up.double()


def _fold_inputs(M, N, K, dtype, device, seed=0):
    """An RMSNorm weight g [K] around 1 and a residual [M, N] (of a size like the outputs')."""
    g = (1 + 0.3 * torch.randn(K, generator=_gen(seed + 5))).to(device, dtype)
    r = torch.randn(M, N, generator=_gen(seed + 6)).to(device, dtype)
    return g, r


def _fold_oracle(x, w, b, glu, g=None, eps=1e-6, r=None):
    """``_oracle`` of the normalized x (float64 ``x g / sqrt(mean(x^2) + eps)``) with g, then ``r + round(y)``
    with r (the residual add reads the output rounded to x's dtype)."""
    xn = x
    if g is not None:
        xd = x.double()
        xn = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps) * g.double()
    y = _oracle(xn, w, b, glu, x.dtype)
    return y if r is None else r.double().cpu() + y.to(x.dtype).double()


FOLDS = [(True, False), (False, True), (True, True)]  # (norm, residual)


def _tol(dtype, glu):
    return (GLU_TOL if glu else TOL)[dtype]


def _kernel():
    from sparsevila_ops.triton_kernels import gemv
    return gemv


TRITON_CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
                  {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("glu", (False, True))
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("cfg", range(len(TRITON_CONFIGS)))
def test_triton_kernel_matches_float64(device, dtype, glu, M, cfg):
    """N = 37 (no multiple of a tile), K = 200 (a partial last slice), x rows strided, bias on odd M."""
    N, K = 37, 200
    x, w, b = _inputs(M, N, K, dtype, device, glu=glu, bias=M % 2 == 1, pad=8, seed=M)
    out = poison(torch.empty(M, N, dtype=dtype, device=device))
    _kernel().launch(x, w, b, glu, out, TRITON_CONFIGS[cfg])
    assert rel_err(out, _oracle(x, w, b, glu)) <= _tol(dtype, glu)


@pytest.mark.parametrize("glu", (False, True))
def test_reference_backend_and_public_function(glu):
    """The reference backend within the rule; glu equals the unfused path (F.linear, F.silu, *) bit for bit."""
    x, w, b = _inputs(5, 21, 48, torch.bfloat16, "cpu", glu=glu, seed=3)
    with so.use_backend("reference"):
        y = so.gemv(x, w, b, glu=glu)
        out = poison(torch.empty(5, 21, dtype=torch.bfloat16))
        assert so.gemv(x, w, b, glu=glu, out=out) is out
    assert rel_err(y, _oracle(x, w, b, glu)) <= _tol(torch.bfloat16, glu)
    assert torch.equal(out, y)
    if glu:
        yf = (x.float() @ w.float().t() + b.float()).to(x.dtype)
        assert torch.equal(y, F.silu(yf[:, :21]) * yf[:, 21:])


@pytest.mark.parametrize("glu", (False, True))
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("norm,res", FOLDS)
def test_triton_folds_match_float64(device, glu, M, norm, res):
    """The Triton backend composes the folds around its kernel: within the rule plus one rounding of the
    normalized x (its kernel's operand)."""
    N, K = 37, 200
    x, w, b = _inputs(M, N, K, torch.bfloat16, device, glu=glu, pad=8, seed=M + 20)
    g, r = _fold_inputs(M, N, K, torch.bfloat16, device, seed=M)
    g, r = (g if norm else None), (r if res else None)
    out = poison(torch.empty(M, N, dtype=torch.bfloat16, device=device))
    _kernel().gemv(x, w, b, glu, g, 1e-5, r, out)
    assert rel_err(out, _fold_oracle(x, w, b, glu, g, 1e-5, r)) <= 2 * _tol(torch.bfloat16, glu)


@pytest.mark.parametrize("glu", (False, True))
def test_reference_folds_are_the_unfused_layer(glu):
    """The reference's folds within the rule of the float64 oracle, and of the unfused path they replace: an
    RMSNorm module (fp32, its output rounded, times g) before the projection, ``residual + linear(h)`` after."""
    M, N, K = 1, 24, 64
    x, w, b = _inputs(M, N, K, torch.bfloat16, "cpu", glu=glu, seed=9)
    g, r = _fold_inputs(M, N, K, torch.bfloat16, "cpu", seed=9)
    with so.use_backend("reference"):
        y = so.gemv(x, w, b, glu=glu, norm_weight=g, eps=1e-6, residual=r)
        plain = so.gemv(x, w, b, glu=glu, residual=r)
    assert rel_err(y, _fold_oracle(x, w, b, glu, g, 1e-6, r)) <= _tol(torch.bfloat16, glu)
    xf = x.float()
    normed = g * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype)  # Qwen2RMSNorm
    with so.use_backend("reference"):
        unfused = r + so.gemv(normed, w, b, glu=glu)
        assert torch.equal(plain, r + so.gemv(x, w, b, glu=glu))
    assert rel_err(y, unfused) <= 2 * _tol(torch.bfloat16, glu)


def test_validation():
    x, w, b = _inputs(2, 16, 32, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="x must have dtype"):
        so.gemv(x.float(), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        so.gemv(x, w.half())
    with pytest.raises(ValueError, match="1 to 8 rows"):
        so.gemv(torch.zeros(9, 32, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="weight must be \\[2N, K\\]"):
        so.gemv(x, w[:15], glu=True)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] = \[M, 32\]"):
        so.gemv(torch.zeros(2, 30, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[16\]"):
        so.gemv(x, w, b[:8])
    with pytest.raises(ValueError, match=r"bias must be \[2N\] = \[16\]"):
        so.gemv(x, w, b[:8], glu=True)
    with pytest.raises(ValueError, match="out must be"):
        so.gemv(x, w, glu=True, out=torch.empty(2, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="glu must be a bool"):
        so.gemv(x, w, glu=1)
    with pytest.raises(ValueError, match="out must be"):
        so.gemv(x, w, out=torch.empty(2, 15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        so.gemv(x, w.t().contiguous().t())
    g = torch.ones(32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"norm_weight must be \[K\] = \[32\]"):
        so.gemv(x, w, norm_weight=g[:16])
    with pytest.raises(TypeError, match="norm_weight must have dtype"):
        so.gemv(x, w, norm_weight=g.float())
    for eps in (-1e-6, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            so.gemv(x, w, norm_weight=g, eps=eps)
    with pytest.raises(ValueError, match=r"residual must be \[M, N\] = \[2, 8\]"):
        so.gemv(x, w, glu=True, residual=torch.zeros(2, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="residual must have dtype"):
        so.gemv(x, w, residual=torch.zeros(2, 16))


def test_cuda_support_rules():
    from sparsevila_ops.cuda_gemv import unsupported
    x, w, b = _inputs(3, 16, 256, torch.bfloat16, "cpu")
    out = torch.empty(3, 16, dtype=torch.bfloat16)
    assert unsupported(x, w, b, out) is None
    assert "dtype" in unsupported(x.float(), w, b, out)
    assert "rows of x" in unsupported(torch.zeros(9, 256, dtype=torch.bfloat16), w, b, out)
    assert "multiple of 8" in unsupported(x[:, :252], w[:, :252], b, out)
    assert "16-byte" in unsupported(torch.zeros(3, 268, dtype=torch.bfloat16)[:, 4:260], w, b, out)
    assert unsupported(torch.zeros(3, 272, dtype=torch.bfloat16)[:, 8:264], w, b, out) is None
    assert "16-byte" in unsupported(x, torch.zeros(16, 260, dtype=torch.bfloat16)[:, :256], b, out)
    assert "contiguous" in unsupported(x, w, b, torch.empty(16, 3, dtype=torch.bfloat16).t())
    assert "cuda" in _backend._REGISTRY["gemv"]
    from sparsevila_ops import linear
    assert linear._preferred_backend(torch.device("cpu"), x, w, b, False, None, 0.0, None, out) is None
    assert autotune.kernel("gemv", "cuda").op == "gemv"
    from sparsevila_ops.cuda_gemv import fold_unsupported
    g, r = _fold_inputs(1, 16, 256, torch.bfloat16, "cpu")
    assert fold_unsupported(x, None, None) is None and fold_unsupported(x[:1], g, r) is None
    assert "1 only" in fold_unsupported(x, g, None)
    assert "16-byte" in fold_unsupported(x[:1], torch.zeros(264, dtype=torch.bfloat16)[4:260], None)
    wide = torch.zeros(1, 12296, dtype=torch.bfloat16)
    assert "K = 12296" in fold_unsupported(wide, torch.zeros(12296, dtype=torch.bfloat16), None)
    assert fold_unsupported(wide, None, torch.zeros(1, 16, dtype=torch.bfloat16)) is None
    strided = torch.zeros(16, 2, dtype=torch.bfloat16)[:, :1].t()
    assert "residual not contiguous" in fold_unsupported(x[:1], None, strided)


def test_triton_default_cuts_its_stages_to_the_gpus_shared_memory(monkeypatch):
    """32-row tiles, K slices of 256 over 5 stages (glu: 128 over 3) where shared memory holds them; fewer stages,
    then 64-wide slices, where it does not; no limit for the interpreter (``"cpu"``)."""
    from sparsevila_ops import _device
    from sparsevila_ops.triton_kernels import gemv as T
    assert _device.smem_per_block_of_gpu("cpu") is None
    key = lambda glu, gpu="NVIDIA H200": T.GemvKey(gpu, torch.bfloat16, 1, 3584, 18944, glu, 132)  # noqa: E731
    limits = {"NVIDIA H200": 232448, "NVIDIA A100-SXM4-80GB": 166912, "NVIDIA GeForce RTX 4090": 101376,
              "Tesla T4": 65536, "tiny": 32768}
    monkeypatch.setattr(T, "smem_per_block_of_gpu", limits.get)
    assert T._default(key(False)) == {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 5}
    assert T._default(key(True)) == {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    assert T._default(key(False, "cpu")) == T._default(key(False))  # no limit known: the preferred config
    assert T._default(key(False, "NVIDIA GeForce RTX 4090"))["num_stages"] == 4  # 4 x 24 KB
    assert T._default(key(False, "tiny"))["BLOCK_K"] == 64
    for gpu, smem in limits.items():
        for glu in (False, True):
            cfg = T._default(key(glu, gpu))
            assert T._resources(key(glu, gpu), cfg)[0] <= smem and cfg["num_stages"] >= 2, (gpu, glu, cfg)


def test_cuda_default_at_batch_2_to_8():
    """Batch 1 keeps the one-wave rule; batch 2-8: 4 rows per warp with K split 4 ways (fewer where a slice would
    hold < 2 chunks of 256), glu 2 rows split 2 ways, 4 warps."""
    from sparsevila_ops import cuda_gemv as C
    key = lambda M, N, K, glu=False: C.GemvKey("gpu", torch.bfloat16, M, N, K, glu, 132)  # noqa: E731
    assert C._default(key(1, 3584, 3584)) == {"rows": 4, "warps": 4, "kwarps": 2}
    for M in (2, 4, 8):
        assert C._default(key(M, 3584, 3584)) == {"rows": 4, "warps": 4, "kwarps": 4}
        assert C._default(key(M, 2048, 1536)) == {"rows": 4, "warps": 4, "kwarps": 2}
        assert C._default(key(M, 2048, 512)) == {"rows": 4, "warps": 4, "kwarps": 1}
        assert C._default(key(M, 18944, 3584, True)) == {"rows": 2, "warps": 4, "kwarps": 2}


@pytest.mark.parametrize("M", [1, 8])
def test_cuda_default_is_in_the_space(M):
    from sparsevila_ops import cuda_gemv as C
    for N, K in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (512, 3584), (8, 8), (152064, 3584)):
        for glu in (False, True):
            key = C.GemvKey("gpu", torch.bfloat16, M, N, K, glu, 132)
            space = C._space(key)
            assert C._default(key) in space
            assert all(c["warps"] % c["kwarps"] == 0 for c in space)


def _cuda_launch(x, w, b, glu, cfg):
    from sparsevila_ops import cuda_gemv
    out = poison(torch.empty(x.shape[0], w.shape[0] // (2 if glu else 1), dtype=x.dtype, device=x.device))
    cuda_gemv._launch(x, w, b, glu, out, cfg)
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("glu", (False, True))
def test_cuda_every_config_of_the_space(glu):
    """N = 37 (no multiple of a CTA's rows), K = 1000 (3 full warp chunks of 256 and a partial one: fewer than most
    K splits), M 5."""
    N, K, M = 37, 1000, 5
    x, w, b = _inputs(M, N, K, torch.bfloat16, "cuda", glu=glu, pad=16, seed=4)
    ref = _oracle(x, w, b, glu)
    space = autotune.config_space("gemv", x, w, b, glu, x.new_empty(M, N), backend="cuda")
    assert len(space) >= 24
    for cfg in space:
        assert rel_err(_cuda_launch(x, w, b, glu, cfg), ref) <= _tol(torch.bfloat16, glu), cfg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("glu", (False, True))
@pytest.mark.parametrize("M,N,K", [(1, 4608, 3584), (2, 3584, 18944), (3, 1031, 8), (4, 520, 1288), (7, 264, 640),
                                   (8, 2048, 1024), (1, 1, 4096)])
def test_cuda_shapes_and_batches(dtype, glu, M, N, K):
    x, w, b = _inputs(M, N, K, dtype, "cuda", glu=glu, bias=M % 2 == 1, pad=8, seed=M + N)
    ref = _oracle(x, w, b, glu)
    for cfg in ({"rows": 1, "warps": 8, "kwarps": 8}, {"rows": 4, "warps": 6, "kwarps": 3},
                {"rows": 2, "warps": 3, "kwarps": 1}):
        assert rel_err(_cuda_launch(x, w, b, glu, cfg), ref) <= _tol(dtype, glu), cfg


def _cuda_fold_launch(x, w, b, glu, g, r, cfg):
    from sparsevila_ops import cuda_gemv
    out = poison(torch.empty(x.shape[0], w.shape[0] // (2 if glu else 1), dtype=x.dtype, device=x.device))
    cuda_gemv._launch(x, w, b, glu, out, cfg, (g, 1e-5, r))
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("glu", (False, True))
@pytest.mark.parametrize("norm,res", FOLDS)
def test_cuda_folds_every_config(glu, norm, res):
    """The folds in the kernel (one row of x), every config of the space (the sums of x^2 of every K split), N =
    37, K = 1000 (a partial chunk), bias on; bitwise repeatable."""
    N, K = 37, 1000
    x, w, b = _inputs(1, N, K, torch.bfloat16, "cuda", glu=glu, seed=13)
    g, r = _fold_inputs(1, N, K, torch.bfloat16, "cuda", seed=13)
    g, r = (g if norm else None), (r if res else None)
    ref = _fold_oracle(x, w, b, glu, g, 1e-5, r)
    for cfg in autotune.config_space("gemv", x, w, b, glu, x.new_empty(1, N), backend="cuda"):
        out = _cuda_fold_launch(x, w, b, glu, g, r, cfg)
        assert rel_err(out, ref) <= _tol(torch.bfloat16, glu), cfg
        assert torch.equal(_cuda_fold_launch(x, w, b, glu, g, r, cfg), out), cfg


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,glu", [(4608, 3584, False), (3584, 3584, False), (18944, 3584, True),
                                     (3584, 18944, False), (896, 8, True)])
def test_cuda_folds_model_shapes_and_routing(dtype, N, K, glu):
    """Qwen2.5-7B's decode GEMVs with their folds (qkv and gate/up normalized, o and down + residual) through the
    op's default routing (the cuda kernel at one row, its config looked up); 3 rows with folds run the Triton
    composition; a misaligned norm weight falls back too."""
    x, w, b = _inputs(1, N, K, dtype, "cuda", glu=glu, seed=N)
    g, r = _fold_inputs(1, N, K, dtype, "cuda", seed=N)
    norm = g if glu or N == 4608 else None
    res = None if norm is not None else r
    y = so.gemv(x, w, b, glu=glu, norm_weight=norm, residual=res)
    assert rel_err(y, _fold_oracle(x, w, b, glu, norm, 1e-6, res)) <= _tol(dtype, glu)
    x3, w3, b3 = _inputs(3, 40, 256, dtype, "cuda", glu=glu, seed=3)
    g3, r3 = _fold_inputs(3, 40, 256, dtype, "cuda", seed=3)
    y3 = so.gemv(x3, w3, b3, glu=glu, norm_weight=g3, residual=r3)
    assert rel_err(y3, _fold_oracle(x3, w3, b3, glu, g3, 1e-6, r3)) <= 2 * _tol(dtype, glu)
    gu = torch.empty(K + 8, dtype=dtype, device="cuda")[4:K + 4].copy_(g)  # 8 bytes off: the Triton composition
    yu = so.gemv(x, w, b, glu=glu, norm_weight=gu)
    assert rel_err(yu, _fold_oracle(x, w, b, glu, g, 1e-6)) <= 2 * _tol(dtype, glu)


@pytest.mark.gpu
@needs_cuda
def test_cuda_routing_repeatable_and_in_a_graph():
    """The op picks the cuda backend by default for covered inputs; results are bitwise repeatable and a CUDA
    graph replays the eager bits; unaligned x rows run the Triton kernel, still correct."""
    x, w, b = _inputs(1, 3584, 3584, torch.bfloat16, "cuda", seed=7)
    assert _backend.resolve("gemv", x.device, (x, w, b, False, None, 0.0, None, x.new_empty(1, 3584))).__module__ \
        == "sparsevila_ops.cuda_gemv"
    y = so.gemv(x, w, b)
    assert rel_err(y, _oracle(x, w, b, False)) <= TOL[torch.bfloat16]
    assert all(torch.equal(so.gemv(x, w, b), y) for _ in range(3))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = so.gemv(x, w, b)
    poison(out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
    xu, wu, bu = _inputs(3, 40, 256, torch.bfloat16, "cuda", glu=True, pad=4, seed=11)  # rows 8 bytes off
    assert rel_err(so.gemv(xu, wu, bu, glu=True), _oracle(xu, wu, bu, True)) <= GLU_TOL[torch.bfloat16]
