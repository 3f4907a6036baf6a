"""Comparison helpers shared by the test suite, the fuzz harness and the benchmarks (one place)."""
from __future__ import annotations

import torch

# Relative L2 error allowed against an fp32/fp64 reference, per input dtype.
REL_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 over elements where ref is finite; inf if out is not finite there,
    or differs from ref where ref is infinite (e.g. an lse of -inf for a row that sees no key). Computed on
    ``ref``'s device (``out`` moves there), so a GPU comparison copies nothing to the host but the result."""
    ref = ref.detach().double()
    out = out.detach().to(device=ref.device, dtype=torch.float64)
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


def nan_padded(shape, dtype: torch.dtype, device, generator: torch.Generator, pad=(16, 0, 8)) -> torch.Tensor:
    """A random ``shape`` tensor as a view into storage ``pad`` larger per dim and NaN outside the view, so a
    kernel that reads past a row's end (or past the last row) poisons its result; strides are not contiguous."""
    store = torch.full([n + p for n, p in zip(shape, pad)], float("nan"), dtype=dtype, device=device)
    view = store[tuple(slice(0, n) for n in shape)]
    view.copy_(torch.randn(*shape, generator=generator, device=device).to(dtype))
    return view
