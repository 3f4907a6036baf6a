"""Host side of ``decode_attention`` on the cuda backend: ``csrc/decode_cluster.cu`` (the splits of a (b, KV head)
row form a thread-block cluster and merge through distributed shared memory), built and loaded by ``_cuda``.

Covered: bf16/fp16, head dim 64 or 128, G = Hq / Hk <= 16, rows of q/k/v 16-byte aligned (the bulk copies
move whole K/V rows), contiguous ``lengths``. Other calls run the Triton backend's kernel (through the backend
registry, so this module never imports Triton), which covers every case of the contract.

Config (``CLUSTER_DECODE``, the autotune seam; default ``_default``): ``cluster`` CTAs (a power of two
<= 16) split a row's keys and merge through distributed shared memory; ``clusters_per_row`` > 1 spreads a row
over several clusters whose partials a second small kernel of the same source merges; ``warps`` per CTA.
Measured slower than the Triton backend on the H100 at batch 1 (bench/NOTES.md), so it is opt-in:
``use_backend("cuda")``. The kernel's per-CTA timeline pointer is always null here (``bench/decode_timeline.py``
sets it through ``_run``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from . import _backend, _cuda, _device
from .autotune import Tunable, gpu_name

LOG2E = 1.4426950408889634
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
_HEAD_DIMS = (64, 128)
MAX_GROUP = 16


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the cluster kernel cannot take these inputs (None: it can)."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (bf16/fp16 only)"
    if q.shape[2] not in _HEAD_DIMS:
        return f"head dim {q.shape[2]} (64 or 128 only)"
    if q.shape[1] // k.shape[1] > MAX_GROUP:
        return f"group size {q.shape[1] // k.shape[1]} > {MAX_GROUP}"
    e = q.element_size()
    for name, t, dims in (("q", q, (0, 1)), ("k", k, (0, 1, 2)), ("v", v, (0, 1, 2))):
        if t.data_ptr() % 16 or any((t.stride(i) * e) % 16 for i in dims if t.shape[i] > 1):
            return f"{name} rows not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=None)
def _max_active_clusters(dtype: int, d: int, cluster: int, warps: int, group: int) -> int:
    return _cuda.library().decode_max_active_clusters(dtype, d, cluster, warps, group)


class ClusterKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    G: int
    B: int
    Hk: int
    cap: int


def _key(q, k, v, lengths, scale, out, lse) -> tuple:
    B, HQ, D = q.shape
    _, HK, cap, _ = k.shape
    return (gpu_name(q.device), q.dtype, D, HQ // max(HK, 1), B, HK, cap)


def _default(key: ClusterKey) -> dict:
    """The (cluster size, clusters per row) that keeps the most CTAs co-resident: for each power-of-two
    cluster size, as many clusters per row as the GPU can co-schedule for all B * Hk rows, each CTA >= 256
    keys at capacity, or >= 128 keys where one cluster takes the whole row (its CTAs combine in the cluster, with
    no second pass); ties go to one cluster per row and then to larger clusters.

    H100 sweep (``python -m bench.decode --sweep-cuda``, Qwen2-7B bf16, ``decode_sweep_cuda.md``): every
    config that fills the GPU lands within 2-3 % (8k 12.6-13.0 us, 32k 30.2-31.2, 128k 99.3-101.7); this pick
    (1 x 33 there) is within 2 % of the best; 12 warps are within noise of 8. H200 trials at 1k keys (Hk 2-8):
    one cluster of 8 per row 1.7-1.8x faster than 5 clusters of 1 (what 256 keys per CTA left), so short rows take
    the 128-key bound (``bench/NOTES.md``)."""
    rows, warps = key.B * key.Hk, 8
    best, best_key = (1, 1), None
    for cluster in (16, 8, 4, 2, 1):
        fit = _max_active_clusters(_DTYPES[key.dtype], key.D, cluster, warps, key.G) // max(rows, 1)
        per_row = min(fit, max(1, key.cap // 256) // cluster)
        if per_row < 1 and fit >= 1 and key.cap // 128 >= cluster:
            per_row = 1
        if per_row < 1:
            continue
        rank = (rows * cluster * per_row, per_row == 1, cluster)
        if best_key is None or rank > best_key:
            best, best_key = (cluster, per_row), rank
    return {"cluster": best[0], "clusters_per_row": best[1], "warps": warps}


def _space(key: ClusterKey) -> list:
    """The cluster sweep of ``python -m bench.decode --sweep-cuda``: every cluster size x 1, 2, half the most
    and the most clusters per row the GPU co-schedules for all B * Hk rows (8 warps), plus 12 warps at
    cluster 8."""
    rows = max(1, key.B * key.Hk)
    fit = {c: _max_active_clusters(_DTYPES[key.dtype], key.D, c, 8, key.G) // rows for c in (1, 2, 4, 8, 16)}
    return ([dict(cluster=c, clusters_per_row=n, warps=8) for c in fit
             for n in sorted({1, 2, fit[c] // 2, fit[c]}) if 1 <= n <= fit[c]]
            + [dict(cluster=8, clusters_per_row=max(1, fit[8]), warps=12)])


def _launch(q, k, v, lengths, scale, out, lse, cfg) -> None:
    _run(q, k, v, lengths, scale, out, lse, cfg["cluster"], cfg["clusters_per_row"], cfg["warps"],
         _device.use_pdl(q.device))


def _run(q, k, v, lengths, scale, out, lse, cluster, clusters_per_row, warps, pdl, timeline_ptr=0) -> None:
    """The one call of the cluster kernel: ``cluster * clusters_per_row`` CTAs per (b, KV head) row.
    ``timeline_ptr``: 0 (the library), or ``bench/decode_timeline.py``'s per-CTA stamps."""
    B, HQ, D = q.shape
    HK = k.shape[1]
    if B == 0 or HQ == 0:
        return
    if clusters_per_row > 1:
        po = torch.empty(B, HQ, clusters_per_row, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(B, HQ, clusters_per_row, dtype=torch.float32, device=q.device)
    else:
        po = pl = lse  # unused
    # the kernel's 12 strides (elements): q (b, h), k and v (b, h, n), out (b, h), lse (b, h)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1))
    _cuda.library().decode_cluster(
        _DTYPES[q.dtype], D, q.data_ptr(), k.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(),
        lse.data_ptr(), po.data_ptr(), pl.data_ptr(), scale * LOG2E, strides, timeline_ptr, B, HK,
        HQ // HK, HQ, cluster * clusters_per_row, cluster, warps, int(pdl),
        torch.cuda.current_stream(q.device).cuda_stream)


def _unsupported(q, k, v, lengths, scale, out, lse) -> Optional[str]:
    """Why the cluster kernel cannot take this launch here: the backend unusable on the device, or the inputs."""
    why = _cuda.unusable(q.device)
    if why is not None:
        return f"the cuda backend cannot run here: {why}"
    return unsupported(q, k, v)


# what decides a config's meaning and speed besides the host code: the kernel sources, the op's binding and
# declaration (_cuda.interface), nvcc flags
_SOURCE = [*(_cuda.source_dir() / f for f in ("decode_cluster.cu", "mbarrier.cuh", "mma_sync.cuh", "launch_util.cuh")),
           _cuda.interface("decode_cluster", "decode_max_active_clusters"), _cuda.NVCC_FLAGS]
CLUSTER_DECODE = Tunable("decode_attention", "cuda", _SOURCE,
                         key=_key, key_type=ClusterKey, space=_space, default=_default, launch=_launch,
                         buckets=("B", "Hk", "cap"), unsupported=_unsupported)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     out: torch.Tensor, lse: torch.Tensor) -> None:
    """Decode over ``k, v [B, Hk, capacity, D]`` up to ``lengths[b]`` in one cluster kernel (module doc); inputs
    it does not cover run the Triton backend's kernel."""
    if q.shape[0] == 0 or q.shape[1] == 0:
        return
    if unsupported(q, k, v) is not None or lengths.stride(0) != 1:  # the cluster kernel reads lengths contiguously
        _backend.implementation("decode_attention", "triton", q.device)(q, k, v, lengths, scale, out, lse)
        return
    CLUSTER_DECODE(q, k, v, lengths, scale, out, lse)
