"""Test setup: Triton kernels run under the interpreter on CPU-only machines; `gpu` tests need CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit module is imported (the decorator reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _triton_interpreter_fixes():
    """Two Triton 3.6 interpreter gaps on this stack (numpy 2.x), patched for CPU runs only: loop bounds read
    from device values are shape-(1,) arrays (``int()`` of them raises), and ``tl.dot`` multiplies the raw
    uint16 bits of bfloat16 tiles. Compiled kernels (GPU) are untouched."""
    if HAS_CUDA:
        yield
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    mp = pytest.MonkeyPatch()
    orig_patch, orig_dot = interp._patch_lang_tensor, interp.InterpreterBuilder.create_dot

    def patch_lang_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    mp.setattr(interp, "_patch_lang_tensor", patch_lang_tensor)
    mp.setattr(interp.InterpreterBuilder, "create_dot", create_dot)
    yield
    mp.undo()


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when present, else the CPU (Triton under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
