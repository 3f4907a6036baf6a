"""Host side of ``decode_attention`` on the cuda backend: ``csrc/decode_cluster.cu`` (one kernel; the splits
of a (b, KV head) row form a thread-block cluster and merge through distributed shared memory).

Covered: bf16/fp16, head dim 64 or 128, G = Hq / Hk <= 16, rows of q/k/v 16-byte aligned (the bulk copies
move whole K/V rows), contiguous ``lengths``. Other calls run the Triton kernel, which covers every case of the
contract.

Config (``decode_config``): ``cluster`` CTAs (a power of two <= 16) split a row's keys and merge through
distributed shared memory; ``clusters_per_row`` > 1 spreads a row over several clusters whose partials the
Triton combine kernel merges (a second grid). Measured slower than the Triton backend on the H100 at
batch 1 (bench/NOTES.md), so it is opt-in: ``use_backend("cuda")``.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from .. import _cuda
from ..triton_kernels import decode as tk

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
    return _cuda.library().svo_decode_max_active_clusters(dtype, d, cluster, warps, group)


@functools.lru_cache(maxsize=None)
def decode_config(B: int, hk: int, group: int, cap: int, dtype: int = 0, d: int = 128) -> dict:
    """The (cluster size, clusters per row) that keeps the most CTAs co-resident: for each power-of-two
    cluster size, as many clusters per row as the GPU can co-schedule for all B * Hk rows, each CTA >= 256
    keys at capacity; ties go to one cluster per row (no combine) and then to larger clusters.

    H100 sweep (``python -m bench.decode --sweep-cuda``, Qwen2-7B bf16, ``decode_sweep_cuda.md``): every
    config that fills the GPU lands within 2-3 % (8k 12.6-13.0 us, 32k 30.2-31.2, 128k 99.3-101.7); this pick
    (1 x 33 there) is within 2 % of the best; 12 warps are within noise of 8."""
    rows, warps = B * hk, 8
    best, best_key = (1, 1), None
    for cluster in (16, 8, 4, 2, 1):
        per_row = min(_max_active_clusters(dtype, d, cluster, warps, group) // max(rows, 1),
                      max(1, cap // 256) // cluster)
        if per_row < 1:
            continue
        key = (rows * cluster * per_row, per_row == 1, cluster)
        if best_key is None or key > best_key:
            best, best_key = (cluster, per_row), key
    return {"cluster": best[0], "clusters_per_row": best[1], "warps": warps}


TIMELINE_STAMPS = 8  # kTimelineStamps in decode_cluster.cu


def _launch(q, k, v, lengths, scale, out, lse, cluster, clusters_per_row, warps, pdl, timeline=None) -> None:
    B, HQ, D = q.shape
    HK = k.shape[1]
    num_chunks = cluster * clusters_per_row
    if clusters_per_row > 1:
        po = torch.empty(B, HQ, clusters_per_row, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(B, HQ, clusters_per_row, dtype=torch.float32, device=q.device)
    else:
        po = pl = lse  # unused
    strides = (ctypes.c_int64 * 12)(q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                                    v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                                    lse.stride(0), lse.stride(1))
    code = _cuda.library().svo_decode_cluster(
        _DTYPES[q.dtype], D, q.data_ptr(), k.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(),
        lse.data_ptr(), po.data_ptr(), pl.data_ptr(), scale * tk.LOG2E, strides,
        timeline.data_ptr() if timeline is not None else None, B, HK, HQ // HK, HQ,
        num_chunks, cluster, warps, int(pdl), torch.cuda.current_stream(q.device).cuda_stream)
    _cuda.check(code, "decode_attention (cuda backend) launch")
    if clusters_per_row > 1:
        tk.combine_partials(po, pl, out, lse, pdl)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     out: torch.Tensor, lse: torch.Tensor, **overrides) -> None:
    """Decode over ``k, v [B, Hk, capacity, D]`` up to ``lengths[b]`` in one cluster kernel (module doc);
    ``overrides`` (cluster, clusters_per_row, warps, pdl) replace the heuristic for tests and sweeps;
    ``timeline=`` an int64 tensor ``[B * Hk, num_chunks, TIMELINE_STAMPS + 2]`` records per-CTA phase clocks
    (``bench/decode_timeline.py``)."""
    B, HQ, _ = q.shape
    if B == 0 or HQ == 0:
        return
    if unsupported(q, k, v) is not None or lengths.stride(0) != 1:  # the cluster kernel reads lengths contiguously
        tk.decode_attention(q, k, v, lengths, scale, out, lse)
        return
    cfg = dict(decode_config(B, k.shape[1], HQ // k.shape[1], k.shape[2], _DTYPES[q.dtype], q.shape[2]))
    cfg["pdl"] = tk._use_pdl(q.device)
    cfg.update(overrides)
    _launch(q, k, v, lengths, scale, out, lse, **cfg)
