"""The ``torch.ops.sparsevila`` library: schema, fake impl and backend dispatch for each op.

Ops are out-variants (``Tensor(a!)`` outputs, ``-> ()``), registered with ``Library.define/impl`` (lower
per-call overhead than ``@custom_op``). The CPU and CUDA kernels of every op are the same small function:
it asks ``_backend.resolve`` which implementation runs (reference, triton, cuda) and calls it with the op's
arguments unchanged.
"""
from __future__ import annotations

import torch

from . import _backend
from ._device import device_guard
from . import reference as _reference

lib = torch.library.Library("sparsevila", "DEF")


def _fake_noop(*args, **kwargs) -> None:
    """Out-variant ops return nothing; their outputs are the (already fake) tensors passed in."""
    return None


def define(name: str, schema: str, *, triton: str | None = None, cuda: str | None = None,
           lib: torch.library.Library = lib, reference=None) -> None:
    """Define ``<lib.ns>::name`` with ``schema`` (by default in ``torch.ops.sparsevila``); its first argument
    (a tensor or a tensor list) picks the device.

    ``reference`` is the reference backend (default ``sparsevila_ops.reference.<name>``); ``triton`` and
    ``cuda`` are ``"module:function"`` of the Triton and CUDA C++ launchers. ``_backend`` keys implementations
    by the bare ``name``, so a name may be defined once across all namespaces (``ValueError`` otherwise).
    """
    if name in _backend._REGISTRY:
        raise ValueError(f"op name {name!r} is already registered with _backend (op names are shared by every "
                         f"namespace); pick another name for {lib.ns}::{name}")
    reference_fn = getattr(_reference, name) if reference is None else reference
    lib.define(f"{name}{schema}")
    torch.library.register_fake(f"{lib.ns}::{name}", _fake_noop, lib=lib)

    def impl(*args):
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
        with device_guard(first.device):  # kernels launch on the current device: make it the tensors'
            return _backend.resolve(name, first.device, args)(*args)

    impl.__name__ = f"{lib.ns}_{name}_dispatch"
    lib.impl(name, impl, "CPU")
    lib.impl(name, impl, "CUDA")
    _backend.register(name, "reference", reference_fn)
    if triton is not None:
        _backend.register(name, "triton", triton)
    if cuda is not None:
        _backend.register(name, "cuda", cuda)
