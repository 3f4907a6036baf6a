"""Comparison helpers shared by the test suite, the fuzz harness and the benchmarks (one place)."""
from __future__ import annotations

import torch

# Relative L2 error allowed against an fp32/fp64 reference, per input dtype.
REL_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 over elements where ref is finite; inf if out is not finite there,
    or differs from ref where ref is infinite (e.g. an lse of -inf for a row that sees no key)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), fin) or not torch.equal(out[~fin], ref[~fin]):
        return float("inf")
    num = (out[fin] - ref[fin]).norm()
    den = ref[fin].norm()
    return float(num / den) if den > 0 else float(num)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN (integers: -12345) so unwritten elements fail the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def patch_triton_interpreter() -> None:
    """Work around two gaps of Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) with numpy 2.x; used by the
    test suite and the fuzz harness on CPU only (compiled GPU kernels are untouched). Idempotent.

    - a loop bound read from a device value is a shape-(1,) array, and ``int()`` of it raises;
    - ``tl.dot`` multiplies the raw uint16 bits of bfloat16 tiles instead of their values;
    - fp32 -> bf16 casts truncate where compiled code rounds to nearest even (doubling bf16 output error).
    """
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if getattr(interp, "_sparsevila_patched", False):
        return
    orig_patch, orig_dot = interp._patch_lang_tensor, interp.InterpreterBuilder.create_dot
    orig_cast = interp.InterpreterBuilder.cast_impl

    def patch_lang_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
            return interp.TensorHandle(rounded, tl.bfloat16)
        return orig_cast(self, src, dst_type)

    interp._patch_lang_tensor = patch_lang_tensor
    interp.InterpreterBuilder.cast_impl = cast_impl
    interp.InterpreterBuilder.create_dot = create_dot
    interp._sparsevila_patched = True
