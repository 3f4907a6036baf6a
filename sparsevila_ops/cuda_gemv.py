"""Host side of ``gemv`` on the cuda backend: ``csrc/gemv.cu`` (fp32-FMA GEMV for 1-8 rows of x, optionally with a
gated MLP's ``silu(gate) * up`` as its epilogue, each lane keeping
8 16-byte chunks of W in flight, double-buffered in registers; K split over a CTA's warps and summed in shared
memory: one launch, deterministic; under PDL the first chunks of W are requested before the dependency wait),
built and loaded by ``_cuda``. At M = 1 the op's folds run in the kernel (``norm_weight``: each CTA stages x * g in
shared memory and sums x^2 while its first weight chunks load, the dot scaled by 1 / rms; ``residual``: added in the
epilogue).

Covered: bf16/fp16, 1 <= M <= 8, K a multiple of 8, x and W with unit column stride and 16-byte aligned rows, out
and bias contiguous; folds at M = 1 with a 16-byte aligned contiguous ``norm_weight`` (K <= ``MAX_NORM_K``) and a
contiguous ``residual``. Other calls run the Triton backend (through the backend registry, so this module never imports
Triton), which covers every case of the op.

Config (``GEMV_CUDA``, the autotune seam; default ``_default``): ``rows`` of W per warp (1, 2, 4), ``warps`` per
CTA (2, 4, 8), of which ``kwarps`` (dividing ``warps``) split K.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _cuda, _device
from .autotune import Tunable
from .linear import GemvKey, gemv_key

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
MAX_ROWS = 8  # rows of x per launch
MAX_NORM_K = 12288  # the norm fold stages x * g as K floats in shared memory (csrc/gemv.cu's kMaxNormK)
WARPS_PER_SM = 16  # the default aims for this many warps per SM (each keeps 8 x 16 B per lane in flight)


def _aligned_rows(t: torch.Tensor) -> bool:
    """Unit column stride, 16-byte aligned start and row stride (a single row: any row stride)."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % 8 == 0)


def unsupported(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor
                ) -> Optional[str]:
    """Why the kernel cannot take these inputs (None: it can)."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (bf16/fp16 only)"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"{x.shape[0]} rows of x (1..{MAX_ROWS})"
    if weight.shape[1] % 8 or weight.shape[1] == 0:
        return f"K = {weight.shape[1]} not a positive multiple of 8"
    if not _aligned_rows(x) or not _aligned_rows(weight):
        return "x or weight not 16-byte aligned rows with unit column stride"
    if not out.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return "out or bias not contiguous"
    return None


def fold_unsupported(x: torch.Tensor, norm_weight: Optional[torch.Tensor], residual: Optional[torch.Tensor]
                     ) -> Optional[str]:
    """Why the kernel cannot fold these (None: it can, or there are none): folds run at one row of x, with
    ``norm_weight`` contiguous, 16-byte aligned and K <= ``MAX_NORM_K``, and ``residual`` contiguous."""
    if norm_weight is None and residual is None:
        return None
    if x.shape[0] != 1:
        return f"folds at {x.shape[0]} rows of x (1 only)"
    if norm_weight is not None and (not norm_weight.is_contiguous() or norm_weight.data_ptr() % 16):
        return "norm_weight not contiguous and 16-byte aligned"
    if norm_weight is not None and x.shape[1] > MAX_NORM_K:
        return f"norm fold at K = {x.shape[1]} (<= {MAX_NORM_K})"
    if residual is not None and not residual.is_contiguous():
        return "residual not contiguous"
    return None


def _default(key: GemvKey) -> dict:
    """Batch 1: 4 output rows per warp; K split over 2, 4 or 8 warps only while the doubled grid still fits in one
    wave of ``WARPS_PER_SM`` warps per SM (each slice >= 2 chunks of 256); 4 warps per CTA (8 when K is split 8
    ways). From the H200 (``bench/NOTES.md``): a grid just over one wave (Qwen2.5-7B's o and down split 2 ways at 2
    rows per warp: 3584 warps for ~2600 resident) ran 1.4x slower than one wave, and 4 rows split 2 ways was the
    tuned winner for o, down and the glu gate/up (1.03-1.24x over 2 rows). Batch 2-8, where each weight feeds M
    rows of x and more warps per row hide the longer chains: 4 rows per warp, K split 4 ways (fewer where a slice
    would hold < 2 chunks of 256), 4 warps; glu 2 rows per warp split 2 ways. On the H200 over 19 GEMVs at batch
    2-8 these were within 1.02x of the best config of the space (geomean; worst 1.11x), the batch-1 rule 1.18x."""
    if key.M > 1:
        if key.glu:
            return {"rows": 2, "warps": 4, "kwarps": 2}
        kwarps = 1
        while kwarps < 4 and key.K >= 512 * 2 * kwarps:
            kwarps *= 2
        return {"rows": 4, "warps": 4, "kwarps": kwarps}
    rows = 4
    warps_per_split = -(-key.N // rows)
    kwarps = 1
    while kwarps < 8 and 2 * warps_per_split * kwarps <= WARPS_PER_SM * key.sms and key.K >= 512 * 2 * kwarps:
        kwarps *= 2
    return {"rows": rows, "warps": max(4, kwarps), "kwarps": kwarps}


def _space(key: GemvKey) -> list:
    """rows 1, 2, 4 x (warps, kwarps) in (2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4), (8, 8)."""
    return [{"rows": r, "warps": w, "kwarps": k} for r in (1, 2, 4)
            for w, k in ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4), (8, 8))]


def _launch(x, weight, bias, glu, out, cfg, folds: Optional[tuple] = None) -> None:
    """One launch with ``cfg``; ``folds``: ``(norm_weight or None, eps, residual or None)`` (``fold_unsupported``
    None for them)."""
    M, N, K = x.shape[0], out.shape[1], weight.shape[1]
    norm, eps, residual = folds if folds is not None else (None, 0.0, None)
    _cuda.library().gemv(
        _DTYPES[x.dtype], x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        M, N, K, x.stride(0) if M > 1 else K, weight.stride(0) if weight.shape[0] > 1 else K, int(glu),
        0 if norm is None else norm.data_ptr(), float(eps), 0 if residual is None else residual.data_ptr(),
        cfg["rows"], cfg["warps"], cfg["kwarps"], int(_device.use_pdl(x.device)),
        torch.cuda.current_stream(x.device).cuda_stream)


def _unsupported(x, weight, bias, glu, out) -> Optional[str]:
    """Why the kernel cannot take this launch here: the backend unusable on the device, or the inputs."""
    why = _cuda.unusable(x.device)
    if why is not None:
        return f"the cuda backend cannot run here: {why}"
    return unsupported(x, weight, bias, out)


# what decides a config's meaning and speed besides the host code: the kernel sources, the op's binding and
# declaration (_cuda.interface), nvcc flags
_SOURCE = [*(_cuda.source_dir() / f for f in ("gemv.cu", "glu.cuh", "launch_util.cuh")), _cuda.interface("gemv"),
           _cuda.NVCC_FLAGS]
GEMV_CUDA = Tunable("gemv", "cuda", _SOURCE, key=gemv_key, key_type=GemvKey, space=_space, default=_default,
                    launch=_launch, buckets=("M", "N", "K"), unsupported=_unsupported)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], glu: bool,
         norm_weight: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``out = x @ W^T (+ bias)`` (glu: ``silu(gate) * up`` of it; with the folds) in one launch of the CUDA kernel
    (module doc), a folded launch with its plain kernel's config; inputs it does not cover run the Triton
    backend."""
    if x.shape[0] == 0 or out.shape[1] == 0:
        return
    if unsupported(x, weight, bias, out) is not None or fold_unsupported(x, norm_weight, residual) is not None:
        _backend.implementation("gemv", "triton", x.device)(x, weight, bias, glu, norm_weight, eps, residual, out)
        return
    args = (x, weight, bias, glu, out)  # the kernel's arguments, the config's key (folds run the plain config)
    GEMV_CUDA.launch(*args, GEMV_CUDA.config(args), (norm_weight, eps, residual))
