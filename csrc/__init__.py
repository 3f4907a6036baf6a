"""CUDA C++ sources of the ``cuda`` backend, shipped as package data (no Python here: the host code lives in
``sparsevila_ops``); JIT-built with ninja + nvcc by ``sparsevila_ops._cuda``."""
