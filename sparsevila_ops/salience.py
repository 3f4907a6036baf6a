"""Op 1: query-agnostic visual salience (mean attention received inside the vision encoder)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _device
from . import _checks as C
from ._library import define

define(
    "visual_salience",
    "(Tensor q, Tensor k, Tensor cu_seqlens, int max_seqlen, float scale, int num_summary, Tensor? lse, "
    "bool deterministic, Tensor(a!) out) -> ()",
    triton="sparsevila_ops.triton_kernels.salience:visual_salience",
    cuda="sparsevila_ops.cuda_salience:visual_salience",
)

# Where no backend is requested, covered inputs (bf16/fp16, head dim 64/72/80/128) run the cuda kernels on a GPU of
# compute capability 9.0 at every length, and elsewhere from sm_90 up to CUDA_MAX_SEQLEN tokens (the mma kernel
# alone). On the H200 (bench/NOTES.md, "Salience column sums with the A operand in registers") the cuda kernels were
# faster than Triton at 64-token windows (mma, 1.7x at 4d1a371), 729-token frames (wgmma, 1.52x two passes / 1.51x
# with the LSE given), 960 (1.24x / 1.30x), 1000 (1.29x / 1.33x), 1024 (1.06x / 1.11x), 1056 (1.02x / 1.17x), 1088
# (1.00x / 1.17x) and 4096 to 32k tokens (1.19x / 1.17x at 32k); before the wgmma kernel's column sums took their A
# operand from registers, Triton won at 961-1056 tokens. The mma kernel alone lost to Triton at 1024 (1.38x slower)
# and from 4096 tokens.
CUDA_MAX_SEQLEN = 960


def summary_rows(max_seqlen: int, num_summary: int) -> int:
    """The most rows of R a segment can have: all ``max_seqlen``, or the first ``num_summary``. Every backend
    sizes R by it, so the LSE and column-sum passes agree."""
    return max_seqlen if num_summary == 0 else min(num_summary, max_seqlen)


def _preferred_backend(device: torch.device, q: torch.Tensor, k, cu_seqlens, max_seqlen: int, *rest):
    """``cuda`` for inputs its kernels cover (``cuda_salience.unsupported``: bf16/fp16, head dim 64/72/80/128) on a
    GPU of compute capability 9.0, or of a later one for segments of at most ``CUDA_MAX_SEQLEN`` tokens; else None
    (the device default, Triton). Importing ``cuda_salience`` builds nothing."""
    if device.type != "cuda" or _device.capability(device) < (9, 0):
        return None
    if max_seqlen > CUDA_MAX_SEQLEN and _device.capability(device) != (9, 0):
        return None
    from .cuda_salience import unsupported
    return "cuda" if unsupported(q, k) is None else None


_backend.prefer("visual_salience", _preferred_backend)


def visual_salience(q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None, *, scale: Optional[float] = None, num_summary: int = 0,
                    lse: Optional[torch.Tensor] = None, reduce_heads: bool = True, deterministic: bool = False,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Salience of every visual token: how much softmax attention it receives within its segment.

    For a segment ``[a, b)`` of length n, rows ``R = [a, b)`` if ``num_summary == 0`` (SigLIP / QwenVL) else
    the first ``min(num_summary, n)`` rows (CLS / summary tokens)::

        P[h, i, j] = exp(scale * q[i, h] . k[j, h] - L[h, i]),  L[h, i] = logsumexp_j (or ``lse`` given)
        out[h, j]  = 1/|R|     * sum_{i in R} P[h, i, j]             (reduce_heads=False: fp32 [H, T])
        out[j]     = 1/(H |R|) * sum_h sum_{i in R} P[h, i, j]       (reduce_heads=True:  fp32 [T])

    Args:
        q, k: ``[T, H, D]`` varlen-packed (or ``[B, N, H, D]``: B segments of length N; the result is then
            ``[B, N]`` / ``[H, B, N]``). fp16/bf16/fp32, last dim contiguous, other strides free.
        cu_seqlens: int32 ``[S+1]`` segment offsets (frames, images, or Qwen2.5-VL windows). None: one segment.
        max_seqlen: longest segment (a Python int; never read from the device). None: computed for 4-D input,
            or the whole T for a single segment.
        scale: softmax scale, default ``D ** -0.5``.
        num_summary: c >= 0, number of leading summary rows per segment (0 = mean over all rows).
        lse: optional fp32 ``[H, T]`` row log-sum-exp from an attention forward that already ran; then one pass
            over QK^T instead of two.
        deterministic: no float atomics; bitwise identical results across runs.
        out: optional preallocated fp32 output.
    Each segment's scores sum to 1 (per head when ``reduce_heads=False``). Extra memory is O(H*T).
    """
    batched = q.dim() == 4
    C.check_tensor("q", q, ndim=4 if batched else 3)
    C.check_tensor("k", k, ndim=q.dim())
    C.check_same_device(q=q, k=k, cu_seqlens=cu_seqlens, lse=lse, out=out)
    C.check_same_dtype(q=q, k=k)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}")
    if batched:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens must be None for 4-D [B, N, H, D] input (segments are the batch rows)")
        B, N = q.shape[:2]
        cu_seqlens = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
        max_seqlen = N if max_seqlen is None else max_seqlen
        q, k = q.flatten(0, 1), k.flatten(0, 1)  # a view when the batch dims are mergeable, else a copy
    T, H, D = q.shape
    C.check_head_dim("q", D)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=q.device)
        max_seqlen = T if max_seqlen is None else max_seqlen
    if max_seqlen is None:
        raise ValueError("max_seqlen must be given (a Python int) with cu_seqlens; it is never read from the device")
    C.check_cu_seqlens("cu_seqlens", cu_seqlens, T, "max_seqlen", max_seqlen)
    scale = C.check_scale(scale, D)
    C.check_int("num_summary", num_summary, lo=0)
    if lse is not None:
        C.check_lse("lse", lse, H, T)
    shape = (T,) if reduce_heads else (H, T)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    else:
        C.check_out("out", out, shape, torch.float32, q.device)
    torch.ops.sparsevila.visual_salience(q, k, cu_seqlens, max_seqlen, scale, num_summary, lse,
                                         bool(deterministic), out)
    if batched:
        return out.view(B, N) if reduce_heads else out.view(H, B, N)
    return out
