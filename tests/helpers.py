"""Shared test helpers: tolerances stated once, poisoning, error metrics, the flash-attention 2x rule."""
from __future__ import annotations

import torch

from sparsevila_ops.testing import REL_TOL, poison, rel_err  # noqa: F401  (re-exported for tests)


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


def column(t: torch.Tensor, width: int = 3) -> torch.Tensor:
    """``t``'s values as column 0 of a ``[..., width]`` table whose other columns are 0: an index tensor with
    last-dim stride ``width`` (the validators accept it, so the kernels must read it with its stride)."""
    table = torch.zeros(*t.shape, width, dtype=t.dtype, device=t.device)
    table[..., 0] = t
    return table[..., 0]
