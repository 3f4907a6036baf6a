"""Backend registry and dispatch.

Every op has one implementation per backend:

- ``reference``: plain torch (``sparsevila_ops.reference``), any device;
- ``triton``: ``sparsevila_ops.triton_kernels.<family>``, default on CUDA; on the CPU it runs only under
  Triton's interpreter (``TRITON_INTERPRET=1``);
- ``cuda``: ``csrc/`` kernels (sm_90+, JIT-built by ``sparsevila_ops._cuda``; host code such as
  ``sparsevila_ops.cuda_decode``) for the ops that have one;
  opt-in (``use_backend("cuda")`` or ``SPARSEVILA_BACKEND=cuda``): the defaults are the kernels measured
  fastest (bench/NOTES.md).

Implementations are registered by import path and imported on first use, so ``import sparsevila_ops``
stays cheap and a broken or missing backend only matters when it is asked for.

Choice, per call: ``use_backend(...)`` context > ``SPARSEVILA_BACKEND`` env var > the op's preference for
these arguments (``prefer``: e.g. ``visual_salience`` takes ``cuda`` for short segments on Hopper, where it
measured faster) when that backend can run here > default for the device (``triton`` on CUDA when Triton imports,
else ``reference``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")

# op name -> backend -> "module:function" (resolved lazily) or a callable.
_REGISTRY: Dict[str, Dict[str, object]] = {}
_RESOLVED: Dict[tuple, Callable] = {}
_PREFER: Dict[str, Callable[..., Optional[str]]] = {}
_local = threading.local()


def register(op: str, backend: str, target) -> None:
    """Register ``target`` (a callable or ``"module:function"``) as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = target
    for key in [k for k in _RESOLVED if k[:2] == (op, backend)]:
        del _RESOLVED[key]


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def requested_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or ``SPARSEVILA_BACKEND``, or None for the device default."""
    forced = getattr(_local, "backend", None)
    if forced is None:
        forced = os.environ.get("SPARSEVILA_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"SPARSEVILA_BACKEND must be one of {BACKENDS}; got {forced!r}")
    return forced


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and _triton_usable(device) else "reference"


def _unusable(op: str, backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device``, or None when it can."""
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        return f"sparsevila op {op!r} has no {backend!r} backend; available: {sorted(impls)}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"there is no CUDA device here to run {op!r} on"
    if backend == "triton" and not _triton_usable(device):
        return (f"backend 'triton' cannot run {op!r} on {device.type}: Triton needs a CUDA device, or "
                f"TRITON_INTERPRET=1 set before import for CPU tensors (install triton if it is missing)")
    if backend == "cuda" and isinstance(impls[backend], str):
        from . import _cuda
        why = _cuda.unusable(device)
        if why is not None:
            return f"backend 'cuda' cannot run {op!r} on {device}: {why}"
    return None


def prefer(op: str, pick: Callable[..., Optional[str]]) -> None:
    """Register ``pick(device, *op_args)``: the backend ``op`` should use for these arguments when none is
    requested (None: the device default). A preferred backend that cannot run here falls back to the default."""
    _PREFER[op] = pick


def resolve(op: str, device: torch.device, args: tuple = ()) -> Callable:
    """The implementation of ``op`` that runs for ``args`` (tensors on ``device``)."""
    forced = requested_backend()
    if forced is not None:
        return implementation(op, forced, device)
    pick = _PREFER.get(op)
    backend = pick(device, *args) if pick is not None and args else None
    if backend is not None and _loadable(op, backend, device):
        return implementation(op, backend, device)
    return implementation(op, default_backend(device), device)


def _loadable(op: str, backend: str, device: torch.device) -> bool:
    """``backend`` can run ``op`` on ``device``, its cuda module built or loaded now (a JIT build runs here, once
    per machine; a failed one is remembered and reported by ``available_backends``)."""
    if _unusable(op, backend, device) is not None:
        return False
    if backend == "cuda" and isinstance(_REGISTRY[op][backend], str):  # a csrc kernel (not a test's callable)
        from . import _cuda
        try:
            _cuda.library()
        except RuntimeError:
            return False
    return True


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """``backend``'s implementation of ``op`` for tensors on ``device`` (imported on first use); RuntimeError
    saying why when it cannot run there."""
    key = (op, backend, device.type)  # the usability check is per device type
    fn = _RESOLVED.get(key)
    if fn is not None:
        return fn
    why = _unusable(op, backend, device)
    if why is not None:
        raise RuntimeError(why)
    if backend == "triton" and device.type != "cuda":  # TRITON_INTERPRET=1: fix the interpreter's gaps first
        from ._interpreter import ensure_patched
        ensure_patched()
    target = _REGISTRY[op][backend]
    if isinstance(target, str):
        mod_name, fn_name = target.split(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(f"backend {backend!r} for {op!r} is unavailable: {e}") from e
    else:
        fn = target
    _RESOLVED[key] = fn
    return fn


@contextlib.contextmanager
def use_backend(backend: Optional[str]) -> Iterator[None]:
    """Force ``backend`` for ops called in this thread inside the block (None: device default)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    prev = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = prev


def available_backends(op: str, device=None) -> List[str]:
    """The backends that can run ``op`` on ``device`` here, in ``BACKENDS`` order: those with an
    implementation of ``op`` whose requirements this machine meets (``reference``: always; ``triton``: a CUDA
    device, or the CPU under ``TRITON_INTERPRET=1``; ``cuda``: a GPU of compute capability >= 9.0 and its kernels
    loaded or buildable here: nvcc, ninja and pybind11, built on first use).

    ``device``: a ``torch.device`` or string; None means the current CUDA device when there is one, else the
    CPU. ``op`` is a public op name (``"decode_attention"``) or an internal one
    (``"prefill_attention_relevance"``); an unknown name raises ``ValueError``.
    """
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {sorted(_REGISTRY)}; got {op!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if _unusable(op, b, device) is None]
