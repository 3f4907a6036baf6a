"""Input validation shared by the public functions.

Each check raises ``TypeError`` (wrong dtype/type) or ``ValueError`` (wrong shape/value/layout) naming the
argument, the rule and what was given. Checks on the *values* of index tensors (``cu_seqlens``, ``lengths``,
``rel_rows``) would need a device-to-host copy; they run when the tensor is on the CPU, or on any device
when ``SPARSEVILA_DEBUG=1``, and never while ``torch.compile`` traces (the values are unknown there) or inside
CUDA-graph capture.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the GEMV ops' activations (gemv, w4a16_linear)
MAX_HEAD_DIM = 256


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read ``t``'s values on the host run: CPU tensors, or any device with
    ``SPARSEVILA_DEBUG=1``; never while tracing for ``torch.compile`` or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if os.environ.get("SPARSEVILA_DEBUG") != "1":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 last_contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}; got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims; got shape {tuple(t.shape)}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride 1); got strides {t.stride()}")


def check_same_device(**tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device; got {', '.join(f'{n} on {d}' for n, d in devs.items())}")


def check_same_dtype(**tensors) -> None:
    dts = {n: t.dtype for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(dts.values())) > 1:
        raise TypeError(f"tensors must share one dtype; got {', '.join(f'{n} {d}' for n, d in dts.items())}")


def check_head_dim(name: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim must be in [1, {MAX_HEAD_DIM}]; got {d}")


def check_gqa(hq: int, hk: int, q_name: str = "q", k_name: str = "k") -> int:
    if hk < 1 or hq % hk != 0:
        raise ValueError(f"{q_name} heads ({hq}) must be a multiple of {k_name} heads ({hk}) (GQA: Hq = G*Hk)")
    return hq // hk


def check_int(name: str, x, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be a Python int (static sizes never live on the device); got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}; got {x}")
    if hi is not None and x > hi:
        raise ValueError(f"{name} must be <= {hi}; got {x}")
    return x


def check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float; got {type(scale).__name__}")
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a finite positive float; got {scale}")
    return scale


def check_cu_seqlens(name: str, cu, total: int, max_name: str, max_seqlen: int) -> int:
    """``cu`` is int32 ``[S+1]``, starts at 0, non-decreasing, ends at ``total``, and no segment is longer
    than ``max_seqlen``. Returns S."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), last_contiguous=False)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must be int32 of shape [S+1] with S >= 0; got shape {tuple(cu.shape)}")
    check_int(max_name, max_seqlen, lo=0)
    if value_checks_enabled(cu):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{name} must start at 0; got {name}[0] == {c[0]}")
        if c[-1] != total:
            raise ValueError(f"{name} must be int32 of shape [S+1] with {name}[-1] == {total} (the packed "
                             f"length); got {name}[-1] == {c[-1]}")
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
        if any(n < 0 for n in lens):
            raise ValueError(f"{name} must be non-decreasing; got {c}")
        if lens and max(lens) > max_seqlen:
            raise ValueError(f"{max_name} must be >= the longest segment of {name} ({max(lens)}); got {max_seqlen}")
    return cu.shape[0] - 1


def check_lse(name: str, lse, h: int, t: int) -> None:
    check_tensor(name, lse, ndim=2, dtypes=(torch.float32,), last_contiguous=True)
    if tuple(lse.shape) != (h, t):
        raise ValueError(f"{name} must be float32 of shape [H, T] = [{h}, {t}]; got {tuple(lse.shape)}")


def check_out(name: str, out, shape, dtype, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {out.dtype}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous; got strides {out.stride()}")


def check_folds(x: torch.Tensor, N: int, norm_weight, eps, residual) -> None:
    """The GEMV ops' folds on ``x [M, K]`` with N outputs per row: ``norm_weight`` None or ``[K]`` in x's dtype with
    ``eps`` a finite number >= 0; ``residual`` None or ``[M, N]`` in x's dtype; both contiguous in their last dim."""
    M, K = x.shape
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,))
        check_same_device(x=x, norm_weight=norm_weight)
        if norm_weight.shape[0] != K:
            raise ValueError(f"norm_weight must be [K] = [{K}]; got {tuple(norm_weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,))
        check_same_device(x=x, residual=residual)
        if tuple(residual.shape) != (M, N):
            raise ValueError(f"residual must be [M, N] = [{M}, {N}]; got {tuple(residual.shape)}")


def device_flag_error(flag: str, name: str) -> Optional[str]:
    """Why a command-line device ``name`` (cpu, cuda or cuda:N) cannot be used here, as one line naming ``flag``;
    None when it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"{flag} must be cpu, cuda or cuda:N; got {name!r}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{flag} {name} needs a CUDA GPU and torch sees none; use {flag} cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{flag} {name}: there are {torch.cuda.device_count()} CUDA devices"
    return None
