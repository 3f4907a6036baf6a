"""Workarounds for gaps of Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied automatically.

``sparsevila_ops.triton_kernels`` calls :func:`ensure_patched` when it is imported (before any ``@triton.jit``
kernel module is loaded), so a script that sets ``TRITON_INTERPRET=1`` and runs ops with the ``triton`` backend
on CPU tensors gets the same numerics as the compiled kernels without calling anything itself. Compiled GPU
kernels never go through ``triton.runtime.interpreter``: nothing here touches them.

Each workaround is applied only where the installed Triton needs it, decided by a probe of the interpreter
itself (not by version number), so an upstream fix turns the workaround off:

============  ==========================================================================  ===================
name          the gap (numpy 2.x)                                                         needed by (checked)
============  ==========================================================================  ===================
``index``     a loop bound read from a device value is a shape-(1,) array and ``int()``   3.6 (fixed in 3.7)
              of it raises ("only 0-dimensional arrays can be converted")
``dot_bf16``  ``tl.dot`` multiplies the raw uint16 bits of bfloat16 tiles, not their      3.6, 3.7.1, 3.9.0
              values
``cast_bf16`` fp32 -> bf16 casts truncate where compiled code rounds to nearest even      3.6, 3.7.1, 3.9.0
              (doubles bf16 output error)
============  ==========================================================================  ===================

``SPARSEVILA_INTERPRETER_PATCHES=0`` turns all of them off (to check whether an upstream fix landed).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Dict, Optional

_lock = threading.Lock()
_applied: Optional[Dict[str, bool]] = None  # name -> applied; None until the first call

# fp32 bit patterns that tell truncation from round-to-nearest-even when cast to bf16:
_F32_ROUNDS_UP = 0x3F80_C000  # 1 + 2^-8 + 2^-9 -> 1 + 2^-7 (0x3F81); truncation gives 1.0 (0x3F80)
_F32_TIE = 0x3F80_8000  # 1 + 2^-8, halfway: ties to the even 1.0 (0x3F80)


def interpreting() -> bool:
    """Whether ``@triton.jit`` kernels are (or will be) interpreted on the CPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def ensure_patched() -> Dict[str, bool]:
    """Apply the workarounds the installed Triton needs when ``TRITON_INTERPRET=1``; no-op otherwise.
    Returns which were applied (empty when not interpreting)."""
    if not interpreting() or os.environ.get("SPARSEVILA_INTERPRETER_PATCHES") == "0":
        return dict(_applied or {})
    return patch_interpreter()


def patch_interpreter() -> Dict[str, bool]:
    """Apply the workarounds this Triton's interpreter needs (idempotent, thread-safe). Returns
    ``{name: applied}``. A workaround whose probe or patch hits interpreter internals it does not know (an
    untested Triton) is skipped with a ``RuntimeWarning``."""
    global _applied
    with _lock:
        if _applied is not None:
            return dict(_applied)
        import triton.runtime.interpreter as interp

        applied = {}
        for name, needed, patch in (("index", _index_needed, _patch_index),
                                    ("dot_bf16", _dot_bf16_needed, _patch_dot_bf16),
                                    ("cast_bf16", _cast_bf16_needed, _patch_cast_bf16)):
            try:
                applied[name] = bool(needed(interp))
                if applied[name]:
                    patch(interp)
            except Exception as e:  # noqa: BLE001 - internals of a Triton version this was not written for
                import triton
                applied[name] = False
                warnings.warn(f"sparsevila_ops: could not check or apply the {name!r} workaround for the Triton "
                              f"{triton.__version__} interpreter ({e!r}); results under TRITON_INTERPRET=1 may "
                              f"differ from compiled kernels", RuntimeWarning, stacklevel=2)
        _applied = applied
        return dict(applied)


# --- index: int() of a shape-(1,) scalar handle (loop bounds loaded from memory) -----------------------------

def _index_needed(interp) -> bool:
    import operator

    import numpy as np
    import triton.language as tl

    class Probe:  # a stand-in for tl.tensor: _patch_lang_tensor only sets attributes on the class
        pass

    scope = interp._LangPatchScope()
    try:
        interp._patch_lang_tensor(Probe, scope)
        t = Probe()
        t.handle = interp.TensorHandle(np.array([3], dtype=np.int32), tl.int32)
        try:
            return operator.index(t) != 3
        except TypeError:
            return True
    finally:
        scope.restore()


def _patch_index(interp) -> None:
    orig_patch = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch_lang_tensor


# --- dot_bf16: tl.dot of bfloat16 tiles -------------------------------------------------------------------------

def _bf16_handle(interp, values):
    import numpy as np
    import triton.language as tl

    bits = (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact for these
    return interp.TensorHandle(bits, tl.bfloat16)


def _dot_bf16_needed(interp) -> bool:
    import numpy as np
    import triton.language as tl

    a = _bf16_handle(interp, [[2.0]])
    b = _bf16_handle(interp, [[3.0]])
    d = interp.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    out = interp.InterpreterBuilder().create_dot(a, b, d, None, None)
    return float(np.asarray(out.data, dtype=np.float64).reshape(-1)[0]) != 6.0


def _patch_dot_bf16(interp) -> None:
    import numpy as np
    import triton.language as tl

    orig_dot = interp.InterpreterBuilder.create_dot

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *args, **kwargs):
        return orig_dot(self, to_f32(a), to_f32(b), *args, **kwargs)

    interp.InterpreterBuilder.create_dot = create_dot


# --- cast_bf16: fp32 -> bf16 rounding -----------------------------------------------------------------------------

def _cast_bf16_needed(interp) -> bool:
    import numpy as np
    import triton.language as tl

    src = interp.TensorHandle(np.array([_F32_ROUNDS_UP, _F32_TIE], dtype=np.uint32)
                              .view(np.float32), tl.float32)
    out = interp.InterpreterBuilder().cast_impl(src, tl.bfloat16)
    return np.asarray(out.data).view(np.uint16).tolist() != [0x3F81, 0x3F80]


def _patch_cast_bf16(interp) -> None:
    import numpy as np
    import triton.language as tl

    orig_cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type, *args, **kwargs):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
            nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000
            rounded = np.where(nan, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN of the same sign
            return interp.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type, *args, **kwargs)

    interp.InterpreterBuilder.cast_impl = cast_impl
