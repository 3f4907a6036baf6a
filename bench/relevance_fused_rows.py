"""kv_relevance as ``prefill_attention_relevance`` runs it: the key's ``m`` is the whole segment, the question rows are
the segment's last ``--rows`` (only ``rel_rows``, on the device, says so). Times the default's tiles and the
alternatives in ``autotune.measure``'s interleaved rounds (each verified against the reference first), for reading
whether the default chosen for ``m`` rows suits a few question rows. An experiment for bench/NOTES.md; nothing in the
library depends on it.

``python -m bench.relevance_fused_rows [--segs 4] [--n 16384] [--rows 64]``
"""
from __future__ import annotations

import argparse

import torch

from bench.common import require_gpu, write_results

CONFIGS = {  # the tiles the relevance default picks between at D 128, G >= 4
    "64 keys x 128 rows": dict(BLOCK_N=64, BLOCK_P=128, num_warps=4, num_stages=3),
    "128 x 64, capped": dict(BLOCK_N=128, BLOCK_P=64, num_warps=4, num_stages=2, maxnreg=168),
    "128 x 64, 8 warps": dict(BLOCK_N=128, BLOCK_P=64, num_warps=8, num_stages=3),
    "128 x 32": dict(BLOCK_N=128, BLOCK_P=32, num_warps=4, num_stages=3),
}


def fused_args(segs: int, n: int, rows: int, Hq: int = 28, Hk: int = 4, D: int = 128, device: str = "cuda"):
    """kv_relevance's arguments for ``segs`` causal self-attention segments of ``n`` tokens whose last ``rows`` are
    the question, with the lse of our prefill."""
    import sparsevila_ops as so
    gen = torch.Generator(device=device).manual_seed(0)
    T = segs * n
    q, k = (torch.randn(T, h, D, generator=gen, device=device, dtype=torch.bfloat16) for h in (Hq, Hk))
    cu = torch.arange(0, T + 1, n, dtype=torch.int32, device=device)
    lse = so.prefill_attention(q, k, k, cu, cu, n, n, causal=True)[1]
    rel_rows = torch.tensor([[n - rows, n]] * segs, dtype=torch.int32, device=device)
    return (q, k, lse, cu, cu, n, n, D ** -0.5, True, rel_rows, torch.zeros(Hk, T, device=device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segs", type=int, default=4)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rows", type=int, default=64)
    a = p.parse_args(argv)
    if not require_gpu("relevance_fused_rows"):
        return 0
    from sparsevila_ops import autotune
    args = fused_args(a.segs, a.n, a.rows)
    t = autotune.kernel("kv_relevance", "triton")
    default = t.default(t.key(*args))
    trials = autotune.measure("kv_relevance", args, list(CONFIGS.values()), rounds=5)
    rows = [{"config": next((name for name, c in CONFIGS.items() if c == x.config), str(x.config)),
             "default": x.config == default, "status": x.status,
             "us": None if x.final_ms is None else 1e3 * x.final_ms} for x in trials]
    for r in rows:
        print(r, flush=True)
    write_results(f"relevance_fused_rows_{a.segs}x{a.n}_{a.rows}", rows, ["config", "default", "status", "us"],
                  title=f"kv_relevance, {a.segs} segments of {a.n} tokens, the last {a.rows} the question rows; "
                        f"default {default}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
