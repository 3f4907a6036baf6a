"""The ``torch.ops.sparsevila`` library: schema, fake impl and backend dispatch for each op.

Ops are out-variants (``Tensor(a!)`` outputs, ``-> ()``), registered with ``Library.define/impl`` (lower
per-call overhead than ``@custom_op``). The CPU and CUDA kernels of every op are the same small function:
it asks ``_backend.resolve`` which implementation runs (reference, triton, cuda) and calls it with the op's
arguments unchanged.
"""
from __future__ import annotations

import torch

from . import _backend, reference

lib = torch.library.Library("sparsevila", "DEF")


def _fake_noop(*args, **kwargs) -> None:
    """Out-variant ops return nothing; their outputs are the (already fake) tensors passed in."""
    return None


def define(name: str, schema: str, *, triton: str | None = None, cuda: str | None = None) -> None:
    """Define ``sparsevila::name`` with ``schema``; its first argument (a tensor or a tensor list) picks the
    device.

    The reference backend is ``reference.<name>``; ``triton`` and ``cuda`` are ``"module:function"`` of the
    Triton and CUDA C++ launchers.
    """
    lib.define(f"{name}{schema}")
    torch.library.register_fake(f"sparsevila::{name}", _fake_noop, lib=lib)

    def impl(*args):
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
        return _backend.resolve(name, first.device)(*args)

    impl.__name__ = f"sparsevila_{name}_dispatch"
    lib.impl(name, impl, "CPU")
    lib.impl(name, impl, "CUDA")
    _backend.register(name, "reference", getattr(reference, name))
    if triton is not None:
        _backend.register(name, "triton", triton)
    if cuda is not None:
        _backend.register(name, "cuda", cuda)
