"""visual_salience on the cuda backend (``csrc/salience.cu``; host side ``sparsevila_ops/cuda_salience.py``).

CPU: the exp2 polynomial (a numpy mirror of the kernel's arithmetic, coefficients parsed from the source), the
registration and the reason the backend gives where it cannot run, the support rules, the Triton fallback for
inputs the kernels do not cover, no Triton import by the host code.
GPU (`gpu`, sm_90+): parity with a float64 oracle and with the Triton backend over awkward segment lengths (1, 7,
97, 729, 1000, 4100, empty), D 64/72/80/128, bf16/fp16, strided and misaligned views whose padding is NaN, lse
given or not, summary rows, both head modes, every polynomial share, bitwise stability, CUDA-graph replay.
Outputs are NaN-poisoned before every kernel call.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import _backend
from sparsevila_ops.testing import nan_padded

from helpers import REL_TOL, assert_rel, poison

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
sm90 = pytest.mark.skipif(not HAS_SM90, reason="the cuda backend needs sm_90+")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "exp2.cuh")
TARGET = "sparsevila_ops.cuda_salience:visual_salience"


@pytest.fixture(autouse=True)
def _real_cuda_registration():
    """tests/test_cli.py's fuzz fixture registers a wrong 'cuda' salience and then pops the entry: put the real one
    back for every test here (test_registered_in_a_fresh_process checks what an import registers)."""
    _backend.register("visual_salience", "cuda", TARGET)
    yield


# ------------------------------------------------------------------------------------- exp2 polynomial (CPU)


def _coefficients():
    text = open(SOURCE).read()
    return [np.float32(re.search(rf"constexpr float kExp2C{i} = ([0-9.eE+-]+)f;", text).group(1)) for i in (1, 2, 3)]


def _fma32(a, b, c):
    """fp32 fma: the exact product and sum in float64 (a float32 product is exact there), rounded once."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def ex2_poly(x):
    """numpy mirror of csrc/exp2.cuh's ex2_poly, operation by operation in float32."""
    c1, c2, c3 = _coefficients()
    x = np.minimum(np.maximum(np.asarray(x, np.float32), np.float32(-127)), np.float32(127))  # fmaxf: NaN -> -127
    x = np.where(np.isnan(x), np.float32(-127), x)
    magic = np.float32(12582912.0)
    t = (magic + np.floor(x)).astype(np.float32)  # __fadd_rd(x, magic): exact, t in [2^23, 2^24)
    f = (x - (t - magic)).astype(np.float32)
    p = _fma32(_fma32(_fma32(np.full_like(f, c3), f, np.full_like(f, c2)), f, np.full_like(f, c1)), f,
               np.ones_like(f))
    bits = (p.view(np.uint32).astype(np.uint64) + (t.view(np.uint32).astype(np.uint64) << np.uint64(23)))
    return (bits & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)


def test_ex2_poly_relative_error_over_the_normal_range():
    """Max relative error over [-126, 0] (where results are normal floats): 8.6e-5 with these coefficients (the
    minimax bound of the degree-3 fit with p(0) = 1); far inside the bf16/fp16 tolerances of the salience tests."""
    x = np.concatenate([np.linspace(-126, 0, 4_000_001, dtype=np.float64),
                        -np.logspace(-12, np.log10(126), 200_001)]).astype(np.float32)
    err = np.abs(ex2_poly(x).astype(np.float64) / np.exp2(x.astype(np.float64)) - 1).max()
    assert err < 9e-5, err
    print(f"ex2_poly max relative error on [-126, 0]: {err:.3e}")


def test_ex2_poly_edges():
    c1, c2, c3 = _coefficients()
    assert 1 + c1 + c2 + c3 < 2  # p(1) < 2: the exponent field never carries
    y = ex2_poly(np.array([0, -1, -8, 1, 10, -0.0], np.float32))
    assert np.allclose(y, [1, 0.5, 2 ** -8, 2, 1024, 1], rtol=1e-4)
    assert ex2_poly(np.float32(0)) == 1  # p(0) == 1 exactly
    # Very negative, -inf and NaN give exactly +0, never a negative or wrapped value; large x stays finite.
    low = ex2_poly(np.array([-127, -127.0, -200, -1e30, -np.inf, np.nan], np.float32))
    assert (low.view(np.uint32) == 0).all()
    grid = ex2_poly(np.linspace(-300, 127.99, 1_000_001, dtype=np.float32))
    assert np.isfinite(grid).all() and (grid >= 0).all()
    assert np.all(np.diff(grid[grid > 2 ** -126].astype(np.float64)) >= 0)  # monotone on the normal range


# ------------------------------------------------------------------------------------- registration (CPU)


def test_registered_in_a_fresh_process():
    code = "import sparsevila_ops; from sparsevila_ops import _backend; print(_backend._REGISTRY['visual_salience'])"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"'cuda': '{TARGET}'" in proc.stdout


def test_cuda_salience_is_opt_in_and_refuses_where_unusable():
    assert _backend.default_backend(torch.device("cpu")) == "reference"
    assert "cuda" not in so.available_backends("visual_salience", "cpu")
    q = torch.zeros(5, 2, 64, dtype=torch.bfloat16)
    with so.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run 'visual_salience'"):
        so.visual_salience(q, q)
    from sparsevila_ops.cuda_salience import SALIENCE_CUDA
    why = SALIENCE_CUDA.unsupported(q, q, torch.tensor([0, 5], dtype=torch.int32), 5, 0.125, 0, None, False,
                                    torch.empty(5))
    assert "compute capability >= 9.0" in why


def test_cuda_salience_support_rules_and_alignment():
    from sparsevila_ops import cuda_salience as cs
    q = torch.zeros(6, 2, 72, dtype=torch.bfloat16)
    assert cs.unsupported(q, q) is None
    assert "dtype" in cs.unsupported(q.float(), q.float())
    assert "head dim" in cs.unsupported(q[..., :40], q[..., :40])
    assert not cs._misaligned(q)
    big = torch.zeros(6, 2, 80, dtype=torch.bfloat16)
    view = big[..., 4:76]  # rows start 8 bytes off
    assert cs._misaligned(view)
    fixed = cs._aligned(view)
    assert fixed.is_contiguous() and not cs._misaligned(fixed) and torch.equal(fixed, view)
    fused = torch.zeros(6, 3, 2, 80, dtype=torch.float16)[:, 1]  # a fused-QKV view: aligned, kept as is
    assert cs._aligned(fused) is fused
    key = cs.SALIENCE_CUDA.key(q, q, torch.tensor([0, 6], dtype=torch.int32), 6, 0.1, 2, None, False, torch.empty(6))
    assert key.rows == 2 and key.S == 1 and not key.lse_given and not key.sm90a
    mma = {"kernel": "mma", "poly_every": 0, "consumers": 2, "tile_n": 128}
    assert cs._default(key) == mma  # no wgmma kernel off compute capability 9.0
    assert cs._space(key) == [{**mma, "poly_every": p} for p in cs.POLY_EVERY]
    hopper = key._replace(sm90a=True)
    assert cs._default(hopper) == mma  # 6-token segments: less than a wgmma tile
    small = {**mma, "kernel": "wgmma", "consumers": 4, "tile_n": 64}
    assert cs._default(hopper._replace(n=cs.WGMMA_MIN_SEQLEN)) == small
    assert cs._default(hopper._replace(n=729)) == small  # SigLIP frames
    assert cs._default(hopper._replace(n=1024)) == small
    assert cs._default(hopper._replace(n=896)) == {**mma, "kernel": "wgmma"}  # 256-row CTAs would pad 896 to 1024
    assert cs._default(hopper._replace(n=257)) == {**mma, "kernel": "wgmma"}
    lse = hopper._replace(lse_given=True)
    wide = {**mma, "kernel": "wgmma"}
    for n in (1280, 2048, 32768):  # two passes: four consumers at every length but where they pad more rows
        assert cs._default(hopper._replace(n=n)) == small
    assert cs._default(hopper._replace(n=32768 + 100)) == wide
    for n in (1280, 2048, 4096, 32768):  # the LSE given: the same rule
        assert cs._default(lse._replace(n=n)) == small
    assert cs._default(lse._replace(n=32768 + 100)) == wide
    space = cs._space(hopper)
    assert {c["kernel"] for c in space} == set(cs.KERNELS) and len(space) == 12 and len(
        {tuple(sorted(c.items())) for c in space}) == 12
    assert {(c["consumers"], c["tile_n"]) for c in space if c["kernel"] == "wgmma"} == set(cs.WGMMA_TILES)


def test_cuda_salience_uncovered_inputs_run_the_triton_kernels(device):
    """fp32 (and head dims other than 64/72/80/128) go to the Triton backend through the registry (without a GPU:
    on the CPU, under the interpreter)."""
    from sparsevila_ops import cuda_salience as cs, reference
    lengths = [9, 0, 1, 20]
    cu = torch.tensor([0, 9, 9, 10, 30], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(30, 2, 40, generator=g).to(device) for _ in range(2))
    assert cs.unsupported(q, k) is not None
    out = poison(torch.empty(2, 30, device=device))
    cs.visual_salience(q, k, cu, max(lengths), 40 ** -0.5, 0, None, False, out)
    ref = torch.empty_like(out)
    reference.visual_salience(q, k, cu, max(lengths), 40 ** -0.5, 0, None, False, ref)
    assert_rel(out, ref, REL_TOL[torch.float32], "fallback")


def test_cuda_salience_host_code_does_not_import_triton():
    """Neither triton nor a Triton kernel module (the ``sparsevila_ops.triton_kernels`` package itself may be
    mapped by ``sparsevila_ops/__init__``'s source-tree mapping: its ``__init__`` imports no Triton)."""
    code = ("import sys, sparsevila_ops.cuda_salience, sparsevila_ops._cuda; "
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', "
            "'sparsevila_ops.triton_kernels.'))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------- GPU


def _cu(lengths, device="cuda"):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=device)


def _padded_inputs(T, H, D, dtype, seed):
    """q, k [T, H, D] as views into [T + 16, H, D + 8] storage whose extra rows and columns are NaN: a read past a
    row's D or past T poisons the result."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [nan_padded((T, H, D), dtype, "cuda", g) for _ in range(2)]


def _oracle(q, k, cu, num_summary=0, lse=None, reduce_heads=True):
    """float64 salience of the (exactly representable) inputs: docs/ops.md, visual_salience."""
    T, H, D = q.shape
    scale = D ** -0.5
    acc = torch.zeros(H, T, dtype=torch.float64, device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        if n == 0:
            continue
        r = n if num_summary == 0 else min(num_summary, n)
        for h in range(H):
            s = (q[a:a + r, h].double() @ k[a:b, h].double().T) * scale
            L = lse[h, a:a + r].double()[:, None] if lse is not None else torch.logsumexp(s, 1, keepdim=True)
            acc[h, a:b] = torch.exp(s - L).sum(0) / r
    return acc.mean(0) if reduce_heads else acc


def _natural_lse(q, k, cu):
    """fp32 [H, T] natural-log row LSE over each segment (every row), as an attention forward returns it."""
    T, H, D = q.shape
    lse = torch.zeros(H, T, dtype=torch.float32, device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            s = torch.einsum("ihd,jhd->hij", q[a:b].double(), k[a:b].double()) * D ** -0.5
            lse[:, a:b] = torch.logsumexp(s, -1).float()
    return lse


def _cuda_salience(q, k, cu, max_seqlen, **kw):
    T, H = q.shape[:2]
    out = poison(torch.empty((T,) if kw.get("reduce_heads", True) else (H, T), dtype=torch.float32,
                             device=q.device))
    with so.use_backend("cuda"):
        got = so.visual_salience(q, k, cu, max_seqlen, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    return got


def _triton_salience(q, k, cu, max_seqlen, **kw):
    with so.use_backend("triton"):
        return so.visual_salience(q, k, cu, max_seqlen, **kw)


ORACLE_TOL = 2e-3  # fp32 accumulation + ex2.approx + the polynomial (<= 8.6e-5) against float64: ~1e-4 expected
AWKWARD = [1, 7, 97, 0, 729, 1000, 4100]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("D", [64, 72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c,lse_given,reduce_heads", [(0, False, True), (0, True, False), (3, False, False),
                                                      (1, True, True)])
def test_cuda_salience_matches_float64_and_triton_gpu(D, dtype, c, lse_given, reduce_heads):
    cu = _cu(AWKWARD)
    T, H = int(cu[-1]), 2
    q, k = _padded_inputs(T, H, D, dtype, seed=D + c)
    lse = None
    if lse_given:
        full = torch.full((H, T + 5), float("nan"), device="cuda")  # a strided [H, T] view
        lse = full[:, :T]
        lse.copy_(_natural_lse(q, k, cu))
    what = f"cuda D={D} {dtype} c={c} lse={lse_given} reduce_heads={reduce_heads}"
    got = _cuda_salience(q, k, cu, max(AWKWARD), num_summary=c, lse=lse, reduce_heads=reduce_heads)
    ref = _oracle(q, k, cu, c, lse, reduce_heads)
    assert_rel(got, ref, ORACLE_TOL, what + " vs float64")
    tri = _triton_salience(q, k, cu, max(AWKWARD), num_summary=c, lse=lse, reduce_heads=reduce_heads)
    assert_rel(got, tri, REL_TOL[dtype], what + " vs triton")
    if not reduce_heads:  # every non-empty segment sums to 1 per head
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if b > a:
                torch.testing.assert_close(got[:, a:b].double().sum(1), torch.ones(H, dtype=torch.float64,
                                                                                      device="cuda"),
                                           rtol=0, atol=2e-4)


HAS_SM90A = HAS_SM90 and torch.cuda.get_device_capability() == (9, 0)
# (kernel, (consumers, tile_n)): the wgmma kernel in each tile shape, the mma kernel (its tiles are fixed)
TILED_KERNELS_HERE = ([("wgmma", (2, 128)), ("wgmma", (4, 64))] if HAS_SM90A else []) + [("mma", (2, 128))]


def _config(kernel: str, tiles, poly_every: int) -> dict:
    return {"kernel": kernel, "poly_every": poly_every, "consumers": tiles[0], "tile_n": tiles[1]}


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("kernel,tiles", TILED_KERNELS_HERE)
@pytest.mark.parametrize("poly_every", [0, 2, 4, 8])
@pytest.mark.parametrize("lse_given", [False, True])
def test_cuda_salience_every_poly_share_gpu(kernel, tiles, poly_every, lse_given):
    """Each kernel (the wgmma one in both tile shapes) at each compiled share of polynomial exp2s (the configs of
    the autotune seam), launched directly."""
    from sparsevila_ops.cuda_salience import SALIENCE_CUDA
    lengths = [97, 1000, 0, 33, 130]
    cu = _cu(lengths)
    T, H, D = int(cu[-1]), 3, 80
    q, k = _padded_inputs(T, H, D, torch.bfloat16, seed=11)
    lse = _natural_lse(q, k, cu) if lse_given else None
    for reduce_heads in (True, False):
        out = poison(torch.empty((T,) if reduce_heads else (H, T), device="cuda"))
        SALIENCE_CUDA.launch(q, k, cu, max(lengths), D ** -0.5, 0, lse, False, out, _config(kernel, tiles, poly_every))
        assert_rel(out, _oracle(q, k, cu, 0, lse, reduce_heads), ORACLE_TOL,
                   f"{kernel} {tiles} poly_every={poly_every} lse={lse_given} reduce_heads={reduce_heads}")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("kernel,tiles", TILED_KERNELS_HERE)
@pytest.mark.parametrize("lse_given", [False, True])
def test_cuda_salience_many_work_items_per_cta_gpu(kernel, tiles, lse_given):
    """More work items than CTAs: the wgmma kernel's persistent grid (one CTA per SM) takes several each, in both
    resident buffers, with empty and one-token segments between long ones and summary rows cutting some segments'
    items short; the result equals the oracle and a second call bit for bit."""
    from sparsevila_ops.cuda_salience import SALIENCE_CUDA
    lengths = [300, 0, 1, 97, 520, 64] * 30
    cu = _cu(lengths)
    T, H, D = int(cu[-1]), 4, 72
    q, k = _padded_inputs(T, H, D, torch.bfloat16, seed=12)
    lse = _natural_lse(q, k, cu) if lse_given else None
    for c, lse_c in ((0, lse), (150, None)):  # a given LSE is over every row: the summary rows compute theirs
        runs = []
        for _ in range(2):
            out = poison(torch.empty(H, T, device="cuda"))
            SALIENCE_CUDA.launch(q, k, cu, max(lengths), D ** -0.5, c, lse_c, False, out, _config(kernel, tiles, 0))
            runs.append(out)
        assert_rel(runs[0], _oracle(q, k, cu, c, lse_c, False), ORACLE_TOL,
                   f"{kernel} {tiles} num_summary={c} lse={lse_c is not None}")
        assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("kernel,tiles", TILED_KERNELS_HERE)
@pytest.mark.parametrize("poly_every", [0, 4])
def test_cuda_salience_lse_pass_follows_scores_far_above_the_first_tile_gpu(kernel, tiles, poly_every):
    """The LSE pass's running max and rescaled sums when later keys score far above the first tile's: keys ~80 and
    ~175 log2 units higher (sums that would overflow fp32 against the first tile's max), then ordinary ones again;
    every row's probabilities must still sum to 1 (a wrong LSE breaks that at once)."""
    from sparsevila_ops.cuda_salience import SALIENCE_CUDA
    lengths = [1500, 300]
    cu = _cu(lengths)
    T, H, D = int(cu[-1]), 2, 80
    g = torch.Generator(device="cuda").manual_seed(5)
    q = (4.0 + 0.1 * torch.randn(T, H, D, device="cuda", generator=g)).to(torch.bfloat16)
    k = (0.1 * torch.randn(T, H, D, device="cuda", generator=g))
    log2_units = D ** -0.5 * 1.4426950408889634 * 4.0 * D  # score per unit of k's mean, in log2 units
    k[400:700] += 80.0 / log2_units  # tile sums near 2^85 x the first tile's max
    k[1000:1100] += 175.0 / log2_units  # 2^175: past fp32 against the first tile's max
    k[1600:1650] += 120.0 / log2_units  # the second segment: in its first tile (128 rows) or its second (64)
    k = k.to(torch.bfloat16)
    out = poison(torch.empty(H, T, device="cuda"))
    SALIENCE_CUDA.launch(q, k, cu, max(lengths), D ** -0.5, 0, None, False, out, _config(kernel, tiles, poly_every))
    what = f"{kernel} {tiles} poly_every={poly_every}"
    assert_rel(out, _oracle(q, k, cu, 0, None, False), ORACLE_TOL, what)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[:, a:b].double().sum(1), torch.ones(H, dtype=torch.float64, device="cuda"),
                                   rtol=0, atol=2e-4, msg=what)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("kernel,tiles", TILED_KERNELS_HERE)
@pytest.mark.parametrize("D", [64, 72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_salience_each_kernel_matches_float64_gpu(kernel, tiles, D, dtype):
    """Both kernels (the default one also runs through the op in the test above) over the awkward segments:
    summary rows, a given lse in a strided [H, T] view whose row stride TMA cannot use (copied), 1 and 5 heads."""
    from sparsevila_ops.cuda_salience import SALIENCE_CUDA
    cu = _cu(AWKWARD)
    T = int(cu[-1])
    for H, c, lse_given in ((5, 0, False), (1, 3, False), (5, 1, True)):
        q, k = _padded_inputs(T, H, D, dtype, seed=D + H)
        lse = None
        if lse_given:
            lse = torch.full((H, T + 5), float("nan"), device="cuda")[:, :T]
            lse.copy_(_natural_lse(q, k, cu))
        out = poison(torch.empty(H, T, device="cuda"))
        SALIENCE_CUDA.launch(q, k, cu, max(AWKWARD), D ** -0.5, c, lse, False, out, _config(kernel, tiles, 0))
        assert_rel(out, _oracle(q, k, cu, c, lse, False), ORACLE_TOL, f"{kernel} {tiles} D={D} {dtype} H={H} c={c}")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("D", [72, 128])
def test_cuda_salience_strided_views_gpu(D):
    """q, k as views of a fused QKV tensor (v NaN), k from a head-major [H, T, D] cache, and a view whose rows
    start 8 bytes off 16-byte alignment (copied by the host code)."""
    lengths = [37, 0, 1, 200, 64]
    cu = _cu(lengths)
    T, H = int(cu[-1]), 3
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(T, 3, H, D, generator=g, device="cuda").to(torch.bfloat16)
    qkv[:, 2] = float("nan")
    q, k = qkv[:, 0], qkv[:, 1]
    assert not q.is_contiguous()
    for c, reduce_heads in ((0, True), (2, False)):
        got = _cuda_salience(q, k, cu, max(lengths), num_summary=c, reduce_heads=reduce_heads)
        assert_rel(got, _oracle(q, k, cu, c, None, reduce_heads), ORACLE_TOL, f"fused qkv c={c}")
    k_hm = torch.randn(H, T, D, generator=g, device="cuda").to(torch.bfloat16).transpose(0, 1)
    got = _cuda_salience(q, k_hm, cu, max(lengths), reduce_heads=False)
    assert_rel(got, _oracle(q, k_hm, cu, 0, None, False), ORACLE_TOL, "head-major k")
    store = torch.randn(T, H, D + 16, generator=g, device="cuda").to(torch.bfloat16)
    q_off = store[..., 4:4 + D]
    got = _cuda_salience(q_off, k, cu, max(lengths))
    assert_rel(got, _oracle(q_off, k, cu), ORACLE_TOL, "misaligned q")


@pytest.mark.gpu
@sm90
def test_cuda_salience_windows_and_frames_gpu():
    """Many short segments (Qwen2.5-VL windows) and SigLIP-like frames with 16 heads, bf16, max_seqlen larger than
    every segment."""
    for lengths, D in (([64] * 20 + [5, 0, 3], 80), ([729] * 6, 72)):
        cu = _cu(lengths)
        T, H = int(cu[-1]), 16
        q, k = _padded_inputs(T, H, D, torch.bfloat16, seed=len(lengths))
        for reduce_heads in (True, False):
            got = _cuda_salience(q, k, cu, max(lengths) + 100, reduce_heads=reduce_heads)
            assert_rel(got, _oracle(q, k, cu, 0, None, reduce_heads), ORACLE_TOL, f"{len(lengths)} segments")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_salience_bitwise_stable_gpu(dtype):
    """No atomics anywhere: repeated calls are bitwise equal, with or without ``deterministic``."""
    cu = _cu(AWKWARD)
    T, H, D = int(cu[-1]), 4, 80
    q, k = _padded_inputs(T, H, D, dtype, seed=4)
    for reduce_heads in (True, False):
        runs = [_cuda_salience(q, k, cu, max(AWKWARD), reduce_heads=reduce_heads, deterministic=det).clone()
                for det in (True, True, False)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.gpu
@sm90
def test_cuda_salience_batched_empty_and_graph_gpu():
    """4-D [B, N, H, D] input, a call whose segments are all empty (T = 0), and CUDA-graph replay."""
    B, N, H, D = 3, 50, 2, 64
    g = torch.Generator(device="cuda").manual_seed(6)
    q4, k4 = (torch.randn(B, N, H, D, generator=g, device="cuda").half() for _ in range(2))
    with so.use_backend("cuda"):
        got = so.visual_salience(q4, k4)
    assert got.shape == (B, N)
    cu = _cu([N] * B)
    assert_rel(got.flatten(), _oracle(q4.flatten(0, 1), k4.flatten(0, 1), cu), ORACLE_TOL, "batched")

    empty = torch.zeros(0, H, D, dtype=torch.bfloat16, device="cuda")
    with so.use_backend("cuda"):
        assert so.visual_salience(empty, empty, _cu([0, 0]), 0).shape == (0,)

    q, k = q4.flatten(0, 1), k4.flatten(0, 1)
    out = torch.empty(B * N, device="cuda")
    with so.use_backend("cuda"):
        so.visual_salience(q, k, cu, N, out=out)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            so.visual_salience(q, k, cu, N, out=out)
    ref = out.clone()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.gpu
@sm90
def test_cuda_salience_falls_back_to_triton_for_fp32_gpu():
    cu = _cu([33, 0, 100])
    T, H, D = 133, 2, 80
    g = torch.Generator(device="cuda").manual_seed(9)
    q, k = (torch.randn(T, H, D, generator=g, device="cuda") for _ in range(2))
    got = _cuda_salience(q, k, cu, 100, reduce_heads=False)
    assert_rel(got, _oracle(q, k, cu, 0, None, False), REL_TOL[torch.float32], "fp32 via triton")


def test_covered_inputs_prefer_the_cuda_backend_on_hopper(monkeypatch):
    """Without a requested backend, covered inputs (bf16/fp16, a covered head dim) pick cuda on compute capability
    9.0 at every length, and up to CUDA_MAX_SEQLEN tokens on later GPUs (the mma kernel alone); anything else keeps
    the device default."""
    from sparsevila_ops import _device, salience
    cap = {"v": (9, 0)}
    monkeypatch.setattr(_device, "capability", lambda d: cap["v"])
    cuda, q = torch.device("cuda"), torch.empty(10, 2, 80, dtype=torch.bfloat16)
    pick = salience._preferred_backend
    assert all(pick(cuda, q, q, None, n) == "cuda" for n in (64, 729, 960, 1024, 1056, 1088, 32768))
    assert pick(cuda, q.float(), q, None, 64) is None
    assert pick(cuda, torch.empty(10, 2, 96, dtype=torch.float16), q, None, 64) is None
    assert pick(torch.device("cpu"), q, q, None, 64) is None
    cap["v"] = (10, 0)
    assert pick(cuda, q, q, None, salience.CUDA_MAX_SEQLEN) == "cuda"
    assert pick(cuda, q, q, None, salience.CUDA_MAX_SEQLEN + 1) is None
    cap["v"] = (8, 0)
    assert pick(cuda, q, q, None, 64) is None


def test_a_preferred_backend_that_cannot_run_falls_back_to_the_default(monkeypatch):
    from sparsevila_ops import _backend
    calls = []
    monkeypatch.setitem(_backend._REGISTRY, "fake_pref_op", {})
    _backend.register("fake_pref_op", "reference", lambda *a: calls.append("reference"))
    _backend.register("fake_pref_op", "triton", lambda *a: calls.append("triton"))
    monkeypatch.setitem(_backend._PREFER, "fake_pref_op", lambda device, x: "triton" if x > 0 else None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run on the CPU now
    cpu = torch.device("cpu")
    _backend.resolve("fake_pref_op", cpu, (1,))(1)
    _backend.resolve("fake_pref_op", cpu, (0,))(0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.resolve("fake_pref_op", cpu, (1,))(1)  # now it can
    with _backend.use_backend("reference"):  # a requested backend wins over the preference
        _backend.resolve("fake_pref_op", cpu, (1,))(1)
    assert calls == ["reference", "reference", "triton", "reference"]
    for key in [k for k in _backend._RESOLVED if k[0] == "fake_pref_op"]:
        del _backend._RESOLVED[key]


def test_nan_padded_views_have_nan_beyond_their_rows():
    v = nan_padded((5, 2, 3), torch.float16, "cpu", torch.Generator().manual_seed(0))
    assert v.shape == (5, 2, 3) and not v.is_contiguous() and torch.isfinite(v).all()
    store = torch.as_strided(v, (5 + 16, 2, 3 + 8), v.stride())
    assert torch.isnan(store[5:]).all() and torch.isnan(store[:, :, 3:]).all()
