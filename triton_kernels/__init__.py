"""Triton kernels, one module per op family; installed as ``sparsevila_ops.triton_kernels``.

Each module exposes launchers with the exact signature of the ``torch.ops.sparsevila`` op they implement
(out-variants: results written into the given tensors).
"""
