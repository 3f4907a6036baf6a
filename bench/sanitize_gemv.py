"""One small launch of every CUDA gemv instantiation, for compute-sanitizer.

    compute-sanitizer --tool memcheck python -m bench.sanitize_gemv
    compute-sanitizer --tool racecheck python -m bench.sanitize_gemv
    compute-sanitizer --tool synccheck python -m bench.sanitize_gemv

``csrc/gemv.cu`` is instantiated per dtype (bf16/fp16) x rows per warp (1, 2, 4) x row bound (M <= 1, 2, 4, 8)
x glu, and at M = 1 per fold (RMSNorm, residual, both); each runs once with a CTA of 8 warps splitting K 1, 2, 4 and
8 ways (the shared-memory reduction at every width) on N = 37 (a partial last CTA) and K = 1000 (a partial last
chunk), x as a view whose padding columns are NaN (a read past K would poison the result), bias on. Each result is
checked against the reference (relative error within the bf16/fp16 tolerance; the folds' reference within twice
it), so a run that the sanitizer passes also computed the right thing. Exits 1 on a
wrong result, 0 otherwise (the sanitizer's own report is its output).
"""
from __future__ import annotations

import sys

import torch

from bench.common import require_gpu
from sparsevila_ops import reference
from sparsevila_ops.testing import REL_TOL, nan_padded, rel_err

N, K = 37, 1000
EPS = 1e-5


def main() -> int:
    if not require_gpu("bench.sanitize_gemv"):
        return 0
    from sparsevila_ops import cuda_gemv
    failures = []
    for dtype in (torch.bfloat16, torch.float16):
        for M in (1, 2, 3, 8):  # the four row bounds
            g = torch.Generator(device="cuda").manual_seed(M)
            x = nan_padded((M, K), dtype, "cuda", g, pad=(0, 8))
            folds = [(None, None)]
            if M == 1:
                norm = (1 + 0.3 * torch.randn(K, device="cuda", generator=g)).to(dtype)
                res = torch.randn(1, N, device="cuda", generator=g).to(dtype)
                folds += [(norm, None), (None, res), (norm, res)]
            for glu in (False, True):
                rows = 2 * N if glu else N
                w = (0.05 * torch.randn(rows, K, device="cuda", generator=g)).to(dtype)
                b = torch.randn(rows, device="cuda", generator=g).to(dtype)
                for norm, res in folds:
                    ref = torch.empty(M, N, dtype=dtype, device="cuda")
                    reference.gemv(x, w, b, glu, norm, EPS, res, ref)
                    tol = REL_TOL[dtype] * (1 if norm is None and res is None else 2)
                    for r in (1, 2, 4):
                        for kw in (1, 2, 4, 8):
                            cfg = {"rows": r, "warps": 8, "kwarps": kw}
                            out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
                            cuda_gemv._launch(x, w, b, glu, out, cfg, (norm, EPS, res))
                            torch.cuda.synchronize()
                            err = rel_err(out, ref)
                            what = (f"{dtype} M={M} glu={glu} norm={norm is not None} residual={res is not None} "
                                    f"{cfg}")
                            status = "ok" if err <= tol else "WRONG"
                            print(f"{status:5s} {what}: rel err {err:.2e}", flush=True)
                            if status != "ok":
                                failures.append(what)
    print(f"{len(failures)} wrong" if failures else "all correct")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
