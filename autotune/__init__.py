"""Kernel configs: one seam per kernel, tuned per-GPU tables, and the tuner (installed as ``sparsevila_ops.autotune``).

Every kernel declares a :class:`Tunable` next to itself (``key``, ``space``, ``default``, ``launch``; see
``tunable.py``). A launch looks its config up: the user cache (``tune`` writes it), then the table shipped for
this GPU (``configs/<gpu>.json``), then the kernel's default (the hand-written heuristic). See ``tables.py`` for
the files and when they are ignored, ``tuner.py`` for how a config is chosen.

Environment: ``SPARSEVILA_AUTOTUNE=1`` tunes a key found in no table on its first launch (never while a CUDA
graph is captured or torch.compile traces); ``SPARSEVILA_AUTOTUNE_CACHE`` moves the user cache.

Benchmarks and tests reach kernels only through the functions below, by op name (``KERNELS``):
:func:`run_with_config`, :func:`default_config`, :func:`config_space`, :func:`lookup`, :func:`measure`,
:func:`tune`, and :func:`make_args` (an op's arguments for a shape). Command line:
``python -m sparsevila_ops.autotune --help``.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple

from .problems import make_args
from .tables import DEFAULT, SHIPPED, USER, cache_path, reset
from .tunable import CPU, Tunable, bucket, gpu_name

_TK = "sparsevila_ops.triton_kernels"
# (op, backend) -> "module:attribute" of its Tunable, imported on first use.
KERNELS: Dict[Tuple[str, str], str] = {
    ("visual_salience.lse", "triton"): f"{_TK}.salience:SALIENCE_LSE",
    ("visual_salience.colsum", "triton"): f"{_TK}.salience:SALIENCE_COLSUM",
    ("prefill_attention", "triton"): f"{_TK}.prefill:PREFILL",
    ("kv_relevance", "triton"): f"{_TK}.prefill:RELEVANCE",
    ("select_kv", "triton"): f"{_TK}.select:SELECT",
    ("pack_kv", "triton"): f"{_TK}.select:PACK",
    ("decode_attention", "triton"): f"{_TK}.decode:DECODE",
    ("sparse_decode_attention", "triton"): f"{_TK}.decode:SPARSE_DECODE",
    ("append_kv", "triton"): f"{_TK}.decode:APPEND",
    ("rope_append_kv", "triton"): f"{_TK}.decode:ROPE_APPEND",
    ("visual_salience", "cuda"): "sparsevila_ops.cuda_salience:SALIENCE_CUDA",
    ("decode_attention", "cuda"): "sparsevila_ops.cuda_decode:CLUSTER_DECODE",
    ("gemv", "triton"): f"{_TK}.gemv:GEMV",
    ("gemv", "cuda"): "sparsevila_ops.cuda_gemv:GEMV_CUDA",
    ("w4a16_linear", "triton"): f"{_TK}.gemv4:W4A16",  # sparsevila_quant::w4a16_linear, the [quant] extra
    ("w4a16_linear", "cuda"): "sparsevila_ops.cuda_gemv4:W4A16_CUDA",
}

__all__ = ["CPU", "DEFAULT", "KERNELS", "SHIPPED", "USER", "Tunable", "bucket", "cache_path", "config_space",
           "default_config", "gpu_name", "kernel", "lookup", "make_args", "measure", "reset", "run_with_config",
           "tune"]


def kernel(op: str, backend: str = "triton") -> Tunable:
    """The Tunable of ``op`` on ``backend``."""
    target = KERNELS.get((op, backend))
    if target is None:
        raise ValueError(f"no tunable kernel {op!r} on backend {backend!r}; known: "
                         f"{sorted(f'{o}/{b}' for o, b in KERNELS)}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def default_config(op: str, *args, backend: str = "triton") -> dict:
    """The default config (the kernel's heuristic) for a launch with ``args``."""
    t = kernel(op, backend)
    return t.default(t.key(*args))


def config_space(op: str, *args, backend: str = "triton") -> List[dict]:
    """The configs the tuner tries for ``args``: the default, then the kernel's space, complete, no repeats."""
    from .tuner import candidates
    t = kernel(op, backend)
    return candidates(t, t.key(*args))


def run_with_config(op: str, config: dict, *args, backend: str = "triton") -> None:
    """Launch ``op`` on ``args`` (the launcher's arguments) with ``config``; the entries it leaves out come from
    the default config."""
    t = kernel(op, backend)
    t.launch(*args, {**t.default(t.key(*args)), **config})


def lookup(op: str, *args, backend: str = "triton") -> Tuple[dict, str]:
    """(config, where it comes from: ``USER``, ``SHIPPED`` or ``DEFAULT``) for a launch with ``args``; never
    tunes."""
    from .tables import lookup as chain
    t = kernel(op, backend)
    return chain(t, t.key(*args))


def measure(op: str, args: tuple, configs: Optional[Sequence[dict]] = None, *, backend: str = "triton", **kw):
    """Verify and time ``configs`` (default: :func:`config_space`) on ``args``; see ``tuner.measure``."""
    from .tuner import measure as run
    return run(kernel(op, backend), args, configs, **kw)


def tune(op: str, args: tuple, *, backend: str = "triton", **kw):
    """Tune ``op`` on ``args`` and store the winner in the user cache; see ``tuner.tune``."""
    from .tuner import tune as run
    return run(kernel(op, backend), args, **kw)
