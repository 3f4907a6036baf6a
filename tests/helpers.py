"""Shared test helpers: tolerances stated once, poisoning, error metrics, the flash-attention 2x rule."""
from __future__ import annotations

import torch

# Relative L2 error allowed against an fp64/fp32 reference, per input dtype.
REL_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN (ints: a sentinel) so unwritten elements fail the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 over elements where ref is finite; inf if out is not finite there
    or differs in where ref is infinite."""
    out, ref = out.double(), ref.double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), fin) or not torch.equal(out[~fin], ref[~fin]):
        return float("inf")
    num = (out[fin] - ref[fin]).norm()
    den = ref[fin].norm()
    return float(num / den) if den > 0 else float(num)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_2x_rule(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, what: str = "",
                   atol: float = 1e-5) -> None:
    """flash-attention's rule: max |out - ref_hi| <= 2 * max |ref_lo - ref_hi| + atol, where ref_lo is the
    torch computation in the inputs' low precision."""
    err = (out.double() - ref_hi.double()).abs().max().item()
    base = (ref_lo.double() - ref_hi.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: max error {err:.3e} > 2 x low-precision torch error {base:.3e} + {atol}"
