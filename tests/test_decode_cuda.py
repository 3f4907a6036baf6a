"""decode_attention on the cuda backend (``csrc/decode_cluster.cu``: one kernel, splits merged in a
thread-block cluster; host side ``sparsevila_ops/cuda_decode.py``) against sparsevila_ops.reference, with the
accuracy rule of test_decode_triton. The loader (build, cache, lock) is tested in test_cuda_build.

CPU: the dispatch rules, the support predicate, the Triton fallback, no Triton import by the cuda host code.
GPU (`gpu`, sm_90+): awkward lengths (0, 1, tile edges, capacity) per row with NaN past each length, strided
caches, every cluster size, rows spread over several clusters (the combine kernel), PDL on and off, G up to 16,
D 64 / 128, fallback to Triton for what the kernel does not cover, and CUDA-graph replay.
"""

import os
import subprocess
import sys

import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import _backend, _cuda

from helpers import column
from test_decode_triton import _check, _inputs, _outs

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
sm90 = pytest.mark.skipif(not HAS_SM90, reason="the cuda backend needs sm_90+")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_backend_is_opt_in_and_refuses_where_unusable():
    assert _backend.default_backend(torch.device("cpu")) == "reference"
    assert "cuda" in _backend._REGISTRY["decode_attention"]  # registered, but not runnable here:
    assert "cuda" not in so.available_backends("decode_attention", "cpu")
    assert "compute capability >= 9.0" in _cuda.unusable(torch.device("cpu"))
    q = torch.zeros(1, 4, 64)
    with so.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        so.decode_attention(q, torch.zeros(1, 1, 8, 64), torch.zeros(1, 1, 8, 64),
                            torch.tensor([8], dtype=torch.int32))


def test_cuda_decode_support_rules():
    from sparsevila_ops.cuda_decode import unsupported
    q, k = torch.zeros(1, 8, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)
    assert unsupported(q, k, k) is None
    assert "dtype" in unsupported(q.float(), k.float(), k.float())
    assert "head dim" in unsupported(q[..., :80], k[..., :80], k[..., :80])
    assert "group size" in unsupported(torch.zeros(1, 34, 128, dtype=torch.bfloat16), k, k)
    kk = torch.zeros(1, 2, 64, 136, dtype=torch.bfloat16)[..., 4:]  # rows start 8 bytes off
    assert "k rows" in unsupported(q, kk, k)


def test_cuda_decode_runs_strided_lengths_on_triton(device):
    """The cluster kernel reads ``lengths`` contiguously, so a strided one (a column of an int32 table) goes to
    the Triton kernel, which honours its stride (without a GPU: on the CPU, under the interpreter)."""
    from sparsevila_ops import cuda_decode as cd
    q, k, v = _inputs(2, 2, 4, 40, 64, torch.bfloat16, device)
    assert cd.unsupported(q, k, v) is None
    lengths = column(torch.tensor([40, 7], dtype=torch.int32, device=device))
    out, lse = _outs(q)
    cd.decode_attention(q, k, v, lengths, 64 ** -0.5, out, lse)
    _check(out, lse, q, k, v, lengths, 64 ** -0.5, "strided lengths on the cuda backend")


def test_cuda_host_code_does_not_import_triton():
    """The cuda backend's host code (decode, and the W4A16 GEMV of the [quant] extra) reaches Triton only through
    the backend registry, for inputs it does not cover: importing it (and the loader) imports neither triton nor
    the Triton kernels."""
    code = ("import sys, sparsevila_ops.cuda_decode, sparsevila_ops.cuda_gemv4, sparsevila_ops._cuda; "  # the bare triton_kernels package
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', "  # (mapped from the
            "'sparsevila_ops.triton_kernels.'))))")  # source tree without an install) imports no kernel
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _nan_tail(k, v, lengths):
    """Fill every cache row past its length with NaN: the kernel must never let them into the output."""
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hk,G", [(4, 7), (2, 16), (3, 1), (1, 5)])
def test_cuda_decode_matches_reference_gpu(dtype, D, Hk, G):
    B, cap = 5, 1000
    q, k, v = _inputs(B, Hk, G, cap, D, dtype, "cuda", seed=D + G)
    lengths = torch.tensor([0, 1, 64, 999, 1000], dtype=torch.int32, device="cuda")
    _nan_tail(k, v, lengths)
    out, lse = _outs(q)
    with so.use_backend("cuda"):
        so.decode_attention(q, k, v, lengths, out=out, lse=lse)
    _check(out, lse, q, k, v, lengths, D ** -0.5, f"cuda decode {dtype} D={D} Hk={Hk} G={G}")
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("clusters_per_row", [1, 3])
@pytest.mark.parametrize("warps,pdl", [(8, False), (8, True), (12, True)])
def test_cuda_decode_cluster_configs_gpu(cluster, clusters_per_row, warps, pdl, monkeypatch):
    from sparsevila_ops.autotune import run_with_config
    B, Hk, G, cap, D = 3, 4, 7, 5000, 128
    q, k, v = _inputs(B, Hk, G, cap, D, torch.bfloat16, "cuda", seed=cluster)
    lengths = torch.tensor([4999, 17, 2500], dtype=torch.int32, device="cuda")
    _nan_tail(k, v, lengths)
    out, lse = _outs(q)
    monkeypatch.setenv("SPARSEVILA_PDL", "1" if pdl else "0")
    run_with_config("decode_attention", dict(cluster=cluster, clusters_per_row=clusters_per_row, warps=warps),
                    q, k, v, lengths, D ** -0.5, out, lse, backend="cuda")
    _check(out, lse, q, k, v, lengths, D ** -0.5, f"cluster {cluster} x {clusters_per_row} warps={warps} pdl={pdl}")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_decode_combine_of_empty_and_full_rows_gpu(D):
    """Rows over 5 clusters, fp16, strided out: an empty row (every cluster's partial -inf: out 0, lse -inf), one
    key, and a row whose keys only reach the first clusters."""
    from sparsevila_ops.autotune import run_with_config
    B, Hk, G, cap = 3, 2, 5, 4000
    q, k, v = _inputs(B, Hk, G, cap, D, torch.float16, "cuda", seed=D)
    lengths = torch.tensor([0, 1, 700], dtype=torch.int32, device="cuda")
    _nan_tail(k, v, lengths)
    out = torch.full((B, Hk * G, 2 * D), float("nan"), dtype=torch.float16, device="cuda")[..., :D]
    lse = torch.full((B, Hk * G), float("nan"), dtype=torch.float32, device="cuda")
    run_with_config("decode_attention", dict(cluster=2, clusters_per_row=5, warps=8), q, k, v, lengths, D ** -0.5,
                    out, lse, backend="cuda")
    _check(out, lse, q, k, v, lengths, D ** -0.5, f"combine D={D}")
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.gpu
@sm90
def test_cuda_decode_falls_back_to_triton_for_uncovered_inputs_gpu():
    B, Hk, G, cap, D = 2, 2, 3, 300, 80  # head dim 80: not covered by the cluster kernel
    q, k, v = _inputs(B, Hk, G, cap, D, torch.bfloat16, "cuda")
    lengths = torch.tensor([300, 45], dtype=torch.int32, device="cuda")
    out, lse = _outs(q)
    with so.use_backend("cuda"):
        so.decode_attention(q, k, v, lengths, out=out, lse=lse)
    _check(out, lse, q, k, v, lengths, D ** -0.5, "fallback D=80")


@pytest.mark.gpu
@sm90
def test_cuda_decode_real_sizes_gpu():
    for Hq, Hk, ctx in [(28, 4, 8192), (28, 4, 131072), (32, 32, 32768)]:
        B, D = 1, 128
        q, k, v = _inputs(B, Hk, Hq // Hk, ctx + 256, D, torch.bfloat16, "cuda", seed=ctx)
        lengths = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        out, lse = _outs(q)
        with so.use_backend("cuda"):
            so.decode_attention(q, k, v, lengths, out=out, lse=lse)
        _check(out, lse, q, k, v, lengths, D ** -0.5, f"cuda decode {Hq}/{Hk} {ctx}")


def test_cuda_default_short_rows_take_one_cluster_of_128_key_ctas(monkeypatch):
    """The default (most co-resident CTAs, each >= 256 keys, or >= 128 where one cluster takes the whole row) with
    a faked occupancy (132 SMs, one 8-warp CTA per SM, 16-CTA clusters fitting 8 times): at 1k keys one cluster
    of 8 per row (was 1 x 4); at 8k and longer what the rule before picks."""
    from sparsevila_ops import cuda_decode as C
    fits = {1: 132, 2: 66, 4: 33, 8: 16, 16: 8}
    monkeypatch.setattr(C, "_max_active_clusters", lambda dtype, d, cluster, warps, group: fits[cluster])
    key = lambda cap, B=1, Hk=4: C.ClusterKey("gpu", torch.bfloat16, 128, 7, B, Hk, cap)  # noqa: E731
    assert C._default(key(1088)) == {"cluster": 8, "clusters_per_row": 1, "warps": 8}  # was 1 x 4
    assert C._default(key(1088, Hk=2)) == {"cluster": 8, "clusters_per_row": 1, "warps": 8}
    assert C._default(key(2112)) == {"cluster": 16, "clusters_per_row": 1, "warps": 8}
    assert C._default(key(1088, Hk=32)) == {"cluster": 4, "clusters_per_row": 1, "warps": 8}  # 8 x 1 does not fit
    assert C._default(key(8256)) == {"cluster": 16, "clusters_per_row": 2, "warps": 8}  # 128 CTAs, as 1 x 32
    assert C._default(key(131136)) == {"cluster": 1, "clusters_per_row": 33, "warps": 8}
    assert C._default(key(200)) == {"cluster": 1, "clusters_per_row": 1, "warps": 8}
