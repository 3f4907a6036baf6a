"""Decode GEMV: the linear layers of a decode step at copy bandwidth (``torch.ops.sparsevila.gemv``).

At batch 1-8 a decode step is a chain of GEMVs that stream the weights once; cuBLAS reaches ~86 % of copy bandwidth
on Qwen2.5-7B's, and less on the small ones (q/k/v, o: a few µs of ramp-up and split-K reduce kernels each,
``bench/NOTES.md``). ``gemv`` is one launch per linear layer that requests its first weights before it waits for
the previous kernel (programmatic dependent launch), and, ``glu=True``, emits a gated MLP's ``silu(gate) * up``
from its fused gate/up projection, so the down projection needs no element-wise kernel before it. A decoder layer's
RMSNorms and residual adds can fold into its GEMVs (``norm_weight``, ``residual``): faster than eager norm and add
kernels, slower than inductor's fused ones under PDL, so the integration does not fold (``bench/NOTES.md``).
Backends: ``cuda`` (``csrc/gemv.cu``, host side ``cuda_gemv``) where it runs, for the inputs it covers, else
``triton`` (``triton_kernels/gemv.py``) on CUDA, ``reference`` (fp32 matmul) on the CPU.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _backend
from . import _checks as C
from ._device import gpu_name, sm_count
from ._library import define

MAX_ROWS = 8  # rows of x (the decode batch) the op serves
HALF_DTYPES = C.HALF_DTYPES

define("gemv", "(Tensor x, Tensor weight, Tensor? bias, bool glu, Tensor? norm_weight, float eps, Tensor? residual, "
       "Tensor(a!) out) -> ()",
       triton="sparsevila_ops.triton_kernels.gemv:gemv", cuda="sparsevila_ops.cuda_gemv:gemv")


def _preferred_backend(device: torch.device, x: torch.Tensor, weight: torch.Tensor, bias, glu, norm_weight, eps,
                       residual, out):
    """``cuda`` on a GPU for inputs its kernel covers (``cuda_gemv.unsupported``), else None (the device default).
    Where the cuda backend cannot run (``_cuda.unusable``), the registry falls back to the default. Importing
    ``cuda_gemv`` builds nothing."""
    if device.type != "cuda":
        return None
    from .cuda_gemv import unsupported
    return "cuda" if unsupported(x, weight, bias, out) is None else None


_backend.prefer("gemv", _preferred_backend)


class GemvKey(NamedTuple):
    """The autotune key of both backends' kernels (``triton_kernels/gemv.py``, ``cuda_gemv.py``)."""
    gpu: str
    dtype: torch.dtype
    M: int  # rows of x (the decode batch)
    N: int  # outputs per row of x (glu: half of W's rows)
    K: int  # in_features
    glu: bool
    sms: int


def gemv_key(x, weight, bias, glu, out) -> tuple:
    """The key of a launch with the kernels' arguments (``GemvKey``'s fields; a launch with folds uses its plain
    kernel's config)."""
    device = x.device
    return gpu_name(device), x.dtype, x.shape[0], out.shape[1], weight.shape[1], bool(glu), sm_count(device)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, glu: bool = False,
         norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ weight^T (+ bias)``, fp32 accumulation, in x's dtype; with ``glu`` (``weight [2N, K]``, ``bias
    [2N]``: a gated MLP's fused gate and up projections) ``silu(y[:, :N]) * y[:, N:]``, each step rounded to x's
    dtype as ``F.silu(gate) * up`` computes it from the two projections.

    Folds: ``norm_weight`` (g ``[K]``) projects ``x * g / sqrt(mean(x^2) + eps)`` instead of x (an RMSNorm folded
    into the projection; fp32, the normalized x not rounded to x's dtype as the RMSNorm module's output is);
    ``residual`` (``[M, N]``) returns ``residual + out``, rounded to x's dtype after ``out`` is (as ``residual +
    linear(h)`` stores it).

    ``x [M, K]`` fp16/bf16 with 1 to 8 rows (the decode batch), ``weight [N, K]`` and ``bias [N]`` in x's dtype,
    last dims contiguous (other strides free), as are ``norm_weight`` and ``residual``; ``out`` a contiguous
    ``[M, N]`` (glu: ``[M, weight rows / 2]``) or None.
    """
    C.check_tensor("x", x, ndim=2, dtypes=HALF_DTYPES)
    C.check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,))
    C.check_same_device(x=x, weight=weight)
    if not isinstance(glu, bool):
        raise TypeError(f"glu must be a bool; got {type(glu).__name__}")
    M, rows, K = x.shape[0], weight.shape[0], weight.shape[1]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows (the decode batch); got {M}")
    if x.shape[1] != K:
        raise ValueError(f"x must be [M, K] = [M, {K}] for weight {tuple(weight.shape)}; got {tuple(x.shape)}")
    if glu and rows % 2:
        raise ValueError(f"weight must be [2N, K] (gate rows, then up rows) with glu; got {rows} rows")
    N = rows // 2 if glu else rows
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        C.check_same_device(x=x, bias=bias)
        if bias.shape[0] != rows:
            raise ValueError(f"bias must be [{'2N' if glu else 'N'}] = [{rows}]; got {tuple(bias.shape)}")
    C.check_folds(x, N, norm_weight, eps, residual)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        C.check_out("out", out, (M, N), x.dtype, x.device)
    torch.ops.sparsevila.gemv(x, weight, bias, glu, norm_weight, float(eps), residual, out)
    return out
