"""Host side of ``visual_salience`` on the cuda backend, built and loaded by ``_cuda``: two kernels of the same passes,
``csrc/salience_wgmma.cu`` (Hopper: TMA tiles, wgmma, a producer warpgroup and two or four consumers that overlap
each tile's QK^T with the previous tile's exp2s, on a persistent grid of one CTA per SM; compute capability 9.0
only) and ``csrc/salience.cu`` (mma.sync tensor cores, cp.async tiles; any sm_90+ GPU), both with part of the exp2s
optionally on the FMA pipe.

The math and pass structure are those of the Triton backend (docs/ops.md): pass 1 (skipped when ``lse`` is given)
writes each row's log2-sum-exp into an fp32 ``[H, T]`` scratch; pass 2 gives every key the mean over the rows of R
of ``2^(scale log2(e) q.k - lse2)``, per head into ``out [H, T]`` or, heads reduced, into an fp32 ``[H, T]``
scratch that a third small kernel sums over heads in order. Nothing is accumulated with atomics, so every call is
bitwise reproducible and ``deterministic`` changes nothing here.

Covered: bf16/fp16, head dim 64, 72, 80 or 128. q/k rows must start 16-byte aligned (cp.async and TMA move
16-byte pieces); views that are not (or have a zero stride) are copied with ``.contiguous()`` first, and so is a
given ``lse`` whose rows TMA cannot address (row stride not a multiple of 4 floats). Other dtypes or head dims run
the Triton backend's kernels (through the backend registry, so this module never imports Triton).

Config (``SALIENCE_CUDA``, the autotune seam; default ``_default``): ``kernel`` "wgmma" (compute capability 9.0)
or "mma"; ``poly_every`` in (0, 2, 4, 8): every ``poly_every``-th column pair of a thread's scores takes its exp2
from the polynomial instead of MUFU (0: none); for the wgmma kernel ``consumers`` x ``tile_n``: 2 consumer warpgroups
of 64 resident rows with 128-row streamed tiles, or 4 with 64-row tiles (``WGMMA_TILES``; a ring of 8 streamed tiles
either way, 4 at head dim 128). The mma kernel's tiles are fixed (4 warps x 128 resident rows, 64-row streamed
tiles, 3 stages) and it ignores those two.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _backend, _cuda, _device
from .autotune import Tunable, gpu_name
from .salience import summary_rows

LOG2E = 1.4426950408889634
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
HEAD_DIMS = (64, 72, 80, 128)
POLY_EVERY = (0, 2, 4, 8)  # the instantiations of csrc/salience.cu and csrc/salience_wgmma.cu
KERNELS = ("wgmma", "mma")
WGMMA_TILES = ((2, 128), (4, 64))  # (consumer warpgroups, streamed rows per tile) of csrc/salience_wgmma.cu


def unsupported(q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """Why the salience kernels cannot take these inputs (None: they can, after :func:`_aligned`)."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (bf16/fp16 only)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (one of {HEAD_DIMS} only)"
    return None


def _misaligned(t: torch.Tensor) -> bool:
    """Rows (token, head) of ``t [T, H, D]`` do not all start 16-byte aligned (or repeat: a zero stride), or the
    last dim is strided."""
    e = t.element_size()
    return (t.data_ptr() % 16 != 0 or (t.shape[2] > 1 and t.stride(2) != 1)
            or any((t.stride(i) * e) % 16 or t.stride(i) <= 0 for i in (0, 1) if t.shape[i] > 1))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a contiguous copy when its rows are not 16-byte aligned (D * 2 bytes is a multiple of 16
    for every covered head dim, so a contiguous tensor always qualifies)."""
    return t.contiguous() if _misaligned(t) else t


class SalienceCudaKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    H: int
    S: int  # segments
    n: int  # max_seqlen
    rows: int  # summed rows per segment: n, or num_summary
    lse_given: bool  # one pass instead of two
    sm90a: bool  # compute capability 9.0: the wgmma kernel runs


def _key(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, deterministic, out) -> tuple:
    _, H, D = q.shape
    device = q.device
    return (gpu_name(device), q.dtype, D, H, cu_seqlens.shape[0] - 1, max_seqlen,
            summary_rows(max_seqlen, num_summary), lse is not None,
            q.is_cuda and _device.capability(device) == (9, 0))


WGMMA_MIN_SEQLEN = 256  # shorter segments fill less than two of the wgmma kernel's 128-row tiles


def _default(key: SalienceCudaKey) -> dict:
    """The wgmma kernel where it runs (its sm_90a code needs compute capability 9.0) for segments of at least
    ``WGMMA_MIN_SEQLEN`` tokens, else the mma kernel; no polynomial exp2s. The wgmma kernel's tiles: four consumer
    warpgroups of 64 rows, but two of 128 where that pads a segment's resident rows less (n mod 256 in (0, 128]:
    four consumers hold 256 rows a CTA, two hold 128). H200, one run (bench/NOTES.md, "Salience column sums with
    the A operand in registers"), four of 64 vs two of 128, ms, two passes / LSE given: 729 tokens 0.605 / 0.296
    vs 0.738 / 0.364; 1024 0.954 / 0.463 vs 1.126 / 0.552; 4096 0.216 / 0.106 vs 0.240 / 0.121; 32k 12.78 / 6.24
    vs 13.85 / 6.69; 896 tokens (padding; probe, an earlier kernel) 1.03 / 0.521 vs 1.013 / 0.488. On the H200
    the wgmma kernel took 0.69-0.94x the mma kernel's time from 729-token frames to 32k tokens, and 2.6x at
    64-token windows, where 3/4 of each 128-row tile is padding. The mma kernel was slower with polynomial exp2s at
    every Figure-3a shape (poly_every 2 / 4 / 8 vs 0: +14-20 % / +6-9 % / +4-6 % time), being bound by its
    mma.sync issue rate, not by MUFU; the wgmma kernel gains at most 3-6 % at poly_every 4 or 8 on some shapes,
    which the tuner picks per key."""
    wgmma = key.sm90a and key.n >= WGMMA_MIN_SEQLEN
    small = wgmma and key.n % 256 not in range(1, 129)
    return {"kernel": "wgmma" if wgmma else "mma", "poly_every": 0, "consumers": 4 if small else 2,
            "tile_n": 64 if small else 128}


def _space(key: SalienceCudaKey) -> list:
    """Both kernels (the wgmma one on compute capability 9.0, in both tile shapes) x ``POLY_EVERY``."""
    mma = [{"kernel": "mma", "poly_every": p, "consumers": 2, "tile_n": 128} for p in POLY_EVERY]
    if not key.sm90a:
        return mma
    return [{"kernel": "wgmma", "poly_every": p, "consumers": c, "tile_n": n} for c, n in WGMMA_TILES
            for p in POLY_EVERY] + mma


def _launch(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, deterministic, out, cfg) -> None:
    _run(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, out, cfg["poly_every"], cfg["kernel"],
         (cfg["consumers"], cfg["tile_n"]))


def _tma_rows(lse: torch.Tensor) -> bool:
    """TMA can read the rows of ``lse [H, T]`` fp32: contiguous rows, 16-byte aligned base and row stride."""
    return (lse.data_ptr() % 16 == 0 and (lse.shape[1] <= 1 or lse.stride(1) == 1)
            and (lse.shape[0] <= 1 or (lse.stride(0) % 4 == 0 and lse.stride(0) > 0)))


def _scratch(H: int, T: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[H, T]`` with rows 16-byte aligned (TMA)."""
    return torch.empty(H, (T + 3) // 4 * 4, dtype=torch.float32, device=device)[:, :T]


def _run(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, out, poly_every, kernel, tiles) -> None:
    """The kernel calls: LSE pass (when ``lse`` is None), column sums, head sum (when ``out`` is ``[T]``), by
    ``kernel`` ("wgmma" with ``tiles`` of ``WGMMA_TILES``, or "mma"). ``q, k`` covered by :func:`unsupported` with
    16-byte aligned rows (:func:`_aligned`)."""
    T, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    if T == 0 or S == 0 or H == 0:
        return
    if poly_every not in POLY_EVERY:
        raise ValueError(f"poly_every must be one of {POLY_EVERY}; got {poly_every!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if tuple(tiles) not in WGMMA_TILES:
        raise ValueError(f"tiles (consumers, tile_n) must be one of {WGMMA_TILES}; got {tiles!r}")
    lib = _cuda.library()
    wgmma = kernel == "wgmma"
    lse_pass, colsum = (lib.salience_wgmma_lse, lib.salience_wgmma_colsum) if wgmma else \
        (lib.salience_lse, lib.salience_colsum)
    size = (T,) if wgmma else ()  # the wgmma kernels' TMA maps need the tensors' length, and take the tile shape
    shape = tuple(tiles) if wgmma else ()
    dt, qk2 = _DTYPES[q.dtype], float(scale) * LOG2E
    qs = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), cu_seqlens.stride(0))
    stream = torch.cuda.current_stream(q.device).cuda_stream
    if lse is None:
        lse2 = _scratch(H, T, q.device)
        lse_pass(dt, D, q.data_ptr(), k.data_ptr(), cu_seqlens.data_ptr(), lse2.data_ptr(), qk2,
                 qs + (0, lse2.stride(0)), *size, S, summary_rows(max_seqlen, num_summary), H, num_summary,
                 poly_every, *shape, stream)
        src, lse_scale = lse2, 1.0
    else:
        src, lse_scale = lse, LOG2E
        if wgmma and not _tma_rows(src):
            src = _scratch(H, T, q.device)
            src.copy_(lse)
    reduce_heads = out.dim() == 1
    dst = torch.empty(H, T, dtype=torch.float32, device=q.device) if reduce_heads else out
    colsum(dt, D, q.data_ptr(), k.data_ptr(), cu_seqlens.data_ptr(), src.data_ptr(), lse_scale, dst.data_ptr(),
           qk2, qs + (src.stride(0), dst.stride(0)), *size, S, max_seqlen, H, num_summary, poly_every, *shape,
           stream)
    if reduce_heads:
        lib.salience_sum_heads(dst.data_ptr(), out.data_ptr(), T, H, dst.stride(0), 1.0 / H, stream)


def _unsupported(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse, deterministic, out) -> Optional[str]:
    """Why the salience kernels cannot take this launch here: the backend unusable on the device, or the inputs."""
    why = _cuda.unusable(q.device)
    if why is not None:
        return f"the cuda backend cannot run here: {why}"
    return unsupported(q, k)


# what decides a config's meaning and speed besides the host code: the kernel sources, the op's binding and
# declaration (_cuda.interface), nvcc flags
_SOURCE = [*(_cuda.source_dir() / f for f in ("salience.cu", "salience_wgmma.cu", "salience_launch.cuh", "exp2.cuh",
                                              "mbarrier.cuh", "wgmma.cuh", "mma_sync.cuh", "launch_util.cuh")),
           _cuda.interface("salience_lse", "salience_colsum", "salience_wgmma_lse", "salience_wgmma_colsum",
                           "salience_sum_heads", "salience_block_rows"), _cuda.NVCC_FLAGS]
SALIENCE_CUDA = Tunable("visual_salience", "cuda", _SOURCE,
                        key=_key, key_type=SalienceCudaKey, space=_space, default=_default, launch=_launch,
                        buckets=("S", "n", "rows"), unsupported=_unsupported)


def visual_salience(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                    num_summary: int, lse: Optional[torch.Tensor], deterministic: bool,
                    out: torch.Tensor) -> None:
    """cuda launcher of ``torch.ops.sparsevila.visual_salience`` (module doc); inputs it does not cover run the
    Triton backend's kernels. Extra memory: fp32 ``[H, T]`` LSE scratch when ``lse`` is None, fp32 ``[H, T]``
    partials when reducing heads. No host syncs."""
    if q.shape[0] == 0 or cu_seqlens.shape[0] == 1:
        return
    if unsupported(q, k) is not None:
        _backend.implementation("visual_salience", "triton", q.device)(q, k, cu_seqlens, max_seqlen, scale,
                                                                      num_summary, lse, deterministic, out)
        return
    SALIENCE_CUDA(_aligned(q), _aligned(k), cu_seqlens, max_seqlen, scale, num_summary, lse, deterministic, out)
