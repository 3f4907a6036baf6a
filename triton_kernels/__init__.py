"""Triton kernels, one module per op family; installed as ``sparsevila_ops.triton_kernels``.

Each module exposes launchers with the exact signature of the ``torch.ops.sparsevila`` op they implement
(out-variants: results written into the given tensors); ``vision`` holds the vision encoder's element-wise kernels
that the HF integration runs in place of transformers' fp32 chains (not ops).

Under ``TRITON_INTERPRET=1`` (CPU) the interpreter workarounds of ``sparsevila_ops._interpreter`` are applied
here, before any kernel module is imported.
"""
from .._interpreter import ensure_patched as _ensure_patched

_ensure_patched()
