"""Plain setuptools: pure Python at install time; Triton kernels JIT-compile on first use, the CUDA C++ kernels
of csrc/ are JIT-built with ninja + nvcc (sparsevila_ops._cuda)."""
from setuptools import setup

setup(
    name="sparsevila_ops",
    version="0.1.0",
    description="Kernels for SparseVILA-R1 visual token sparsity: streaming salience, fused relevance, "
                "select+pack, split-KV decode",
    python_requires=">=3.10",
    packages=["sparsevila_ops", "sparsevila_ops.triton_kernels", "sparsevila_ops.csrc"],
    package_dir={"sparsevila_ops": "sparsevila_ops", "sparsevila_ops.triton_kernels": "triton_kernels",
                 "sparsevila_ops.csrc": "csrc"},
    package_data={"sparsevila_ops.csrc": ["*.cu"]},
    # torch is deliberately unpinned beyond a floor: install it first (CPU: pip install torch==2.13.0) so pip
    # never resolves a multi-GB CUDA build on its own.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["triton==3.6.0", "pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11", "matplotlib"],
        "cuda": ["ninja"],
        "hf": ["transformers>=4.50"],
        "bench": ["matplotlib", "triton>=3.2"],
    },
)
