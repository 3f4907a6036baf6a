"""One small launch of every CUDA salience kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python -m bench.sanitize_salience
    compute-sanitizer --tool racecheck python -m bench.sanitize_salience
    compute-sanitizer --tool synccheck python -m bench.sanitize_salience
    compute-sanitizer --tool racecheck python -m bench.sanitize_salience --consumers 4 --poly 0 4   # a subset

Every instantiation of ``csrc/salience.cu`` and ``csrc/salience_wgmma.cu`` (bf16/fp16 x D 64/72/80/128 x poly_every
0/2/4/8, LSE pass and column-sum pass; the wgmma kernel, in both tile shapes, where the GPU runs it) runs once on
varlen segments with an empty one, a length-1 one, partial tiles and several key blocks (lengths 1, 0, 97, 200,
repeated ``--repeat`` times, 48 by default: the wgmma kernel's persistent CTAs each take two or more work items, so
both resident buffers and the ring's phases wrap), q/k as views whose padding columns and extra rows are NaN; then
the column sums given an LSE, summary rows, and the head sum. Each result is checked against the torch reference
(finite, relative error within the bf16/fp16 tolerance), so a run that the sanitizer passes also computed the right
thing. Exits 1 on a wrong result, 0 otherwise (the sanitizer's own report is its output). ``--consumers C`` /
``--poly P ...`` keep only the configs with those values (the wgmma kernel's tile shape, the polynomial shares),
for a shorter run; so does a smaller ``--repeat`` (racecheck takes minutes at 48).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from bench.common import require_gpu
from sparsevila_ops import reference
from sparsevila_ops.testing import REL_TOL, nan_padded, rel_err

LENGTHS = [1, 0, 97, 200]
H = 2


def _views(T: int, D: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [nan_padded((T, H, D), dtype, "cuda", g) for _ in range(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sanitize_salience", description=__doc__.split("\n\n")[0])
    p.add_argument("--consumers", type=int, default=None, help="only configs with this many consumer warpgroups")
    p.add_argument("--poly", type=int, nargs="+", default=None, help="only configs with these poly_every values")
    p.add_argument("--repeat", type=int, default=48, help="how many times the segment lengths repeat")
    a = p.parse_args(argv)
    if not require_gpu("bench.sanitize_salience"):
        return 0

    def keep(cfg) -> bool:
        return ((a.consumers is None or cfg["consumers"] == a.consumers)
                and (a.poly is None or cfg["poly_every"] in a.poly))
    from sparsevila_ops import autotune
    from sparsevila_ops.cuda_salience import HEAD_DIMS, SALIENCE_CUDA
    lengths = LENGTHS * a.repeat
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device="cuda")
    T, n = sum(lengths), max(lengths)
    failures = []

    def check(what, got, ref, dtype):
        torch.cuda.synchronize()
        err = rel_err(got, ref)
        status = "ok" if err <= REL_TOL[dtype] else "WRONG"
        print(f"{status:5s} {what}: rel err {err:.2e}", flush=True)
        if status != "ok":
            failures.append(what)

    for dtype in (torch.bfloat16, torch.float16):
        for D in HEAD_DIMS:
            q, k = _views(T, D, dtype, seed=D)
            scale = D ** -0.5
            ref_h = torch.empty(H, T, device="cuda")
            reference.visual_salience(q, k, cu, n, scale, 0, None, False, ref_h)
            for cfg in filter(keep, autotune.config_space("visual_salience", q, k, cu, n, scale, 0, None, False,
                                                          ref_h, backend="cuda")):  # both passes
                out = torch.full((H, T), float("nan"), device="cuda")
                SALIENCE_CUDA.launch(q, k, cu, n, scale, 0, None, False, out, cfg)
                check(f"{dtype} D={D} {cfg} two passes", out, ref_h, dtype)
    # The column sums from a given natural-log LSE (strided rows), summary rows, and the head sum.
    dtype, D = torch.bfloat16, 80
    q, k = _views(T, D, dtype, seed=1)
    scale = D ** -0.5
    lse = torch.full((H, T + 3), float("nan"), device="cuda")[:, :T]
    lse.copy_(reference.segment_lse(q, k, cu, scale))
    space = autotune.config_space("visual_salience", q, k, cu, n, scale, 0, lse, True, torch.empty(T, device="cuda"),
                                  backend="cuda")
    for cfg in [c for c in space if c["poly_every"] == 4 and a.consumers in (None, c["consumers"])]:  # each
        # kernel and tile shape
        for c, given in ((0, lse), (3, None), (1, lse)):
            out, ref = torch.full((T,), float("nan"), device="cuda"), torch.empty(T, device="cuda")
            SALIENCE_CUDA.launch(q, k, cu, n, scale, c, given, True, out, cfg)
            reference.visual_salience(q, k, cu, n, scale, c, given, True, ref)
            check(f"{cfg}: heads reduced, num_summary={c}, lse given={given is not None}", out, ref, dtype)
    print("all results right" if not failures else f"WRONG: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
