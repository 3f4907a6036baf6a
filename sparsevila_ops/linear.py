"""Decode GEMV: the linear layers of a decode step at copy bandwidth (``torch.ops.sparsevila.gemv``).

At batch 1-8 a decode step is a chain of GEMVs that stream the weights once; cuBLAS reaches ~86 % of copy bandwidth
on Qwen2.5-7B's, and less on the small ones (q/k/v, o: a few µs of ramp-up and split-K reduce kernels each,
``bench/NOTES.md``). ``gemv`` is one launch per linear layer that requests its first weights before it waits for
the previous kernel (programmatic dependent launch), and, ``gated=True``, computes a gated MLP's ``silu(gate) * up``
on the fly from the fused gate/up output, so the down projection needs no element-wise kernel before it.
Backends: ``cuda`` (``csrc/gemv.cu``, host side ``cuda_gemv``) where it runs, for the inputs it covers, else
``triton`` (``triton_kernels/gemv.py``) on CUDA, ``reference`` (fp32 matmul) on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend
from . import _checks as C
from ._library import define

MAX_ROWS = 8  # rows of x (the decode batch) the op serves
HALF_DTYPES = (torch.float16, torch.bfloat16)

define("gemv", "(Tensor x, Tensor weight, Tensor? bias, bool gated, Tensor(a!) out) -> ()",
       triton="sparsevila_ops.triton_kernels.gemv:gemv", cuda="sparsevila_ops.cuda_gemv:gemv")


def _preferred_backend(device: torch.device, x: torch.Tensor, weight: torch.Tensor, bias, gated, out):
    """``cuda`` on a GPU for inputs its kernel covers (``cuda_gemv.unsupported``), else None (the device default).
    Where the cuda backend cannot run (``_cuda.unusable``), the registry falls back to the default. Importing
    ``cuda_gemv`` builds nothing."""
    if device.type != "cuda":
        return None
    from .cuda_gemv import unsupported
    return "cuda" if unsupported(x, weight, bias, out) is None else None


_backend.prefer("gemv", _preferred_backend)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, gated: bool = False,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[M, N] = h @ weight^T (+ bias)``, fp32 accumulation, in x's dtype; ``h = x`` (``x [M, K]``), or with
    ``gated`` ``h = silu(x[:, :K]) * x[:, K:]`` (``x [M, 2K]``: a gated MLP's fused gate/up output), each step
    rounded to x's dtype as ``F.silu(gate) * up`` computes it.

    ``x`` fp16/bf16 with 1 to 8 rows (the decode batch), ``weight [N, K]`` and ``bias [N]`` in x's dtype, last
    dims contiguous (other strides free); ``out`` a contiguous ``[M, N]`` or None.
    """
    C.check_tensor("x", x, ndim=2, dtypes=HALF_DTYPES)
    C.check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,))
    C.check_same_device(x=x, weight=weight)
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool; got {type(gated).__name__}")
    M, N, K = x.shape[0], weight.shape[0], weight.shape[1]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"x must have 1 to {MAX_ROWS} rows (the decode batch); got {M}")
    if x.shape[1] != (2 * K if gated else K):
        raise ValueError(f"x must be [M, {'2K' if gated else 'K'}] = [M, {2 * K if gated else K}] for weight "
                         f"[N, K] = {tuple(weight.shape)}{' (gated)' if gated else ''}; got {tuple(x.shape)}")
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        C.check_same_device(x=x, bias=bias)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N] = [{N}]; got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        C.check_out("out", out, (M, N), x.dtype, x.device)
    torch.ops.sparsevila.gemv(x, weight, bias, gated, out)
    return out
