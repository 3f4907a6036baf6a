"""Test setup: Triton kernels run under the interpreter on CPU-only machines; `gpu` tests need CUDA. On a GPU
machine every test on the `device` fixture is a `gpu` test too, so `pytest -m gpu` runs the kernel tests there. Every
test on pytest-benchmark's `benchmark` fixture is `serial` (that plugin disables the fixture under pytest-xdist)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit module is imported (the decorator reads it). The interpreter
    # workarounds are applied by the library itself (sparsevila_ops._interpreter) when the kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serial)
    if HAS_CUDA:  # kernel tests on the `device` fixture run on the GPU there: `-m gpu` (gpu_check.sh) selects them
        for item in items:
            if "device" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when present, else the CPU (Triton under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
