"""CUDA C++ sources of the ``cuda`` backend, JIT-built with ninja by ``sparsevila_ops._cuda``."""
