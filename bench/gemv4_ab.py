"""Same-machine A/B of two builds of ``bench/gemv4_probe.cu`` from their ``time`` sweeps (``bench/gemv4_ab.sh``).

``python -m bench.gemv4_ab A_1.log A_2.log -- B_1.log B_2.log``: each side's sweeps are averaged per config (a
``cfg`` line: batch, shape, tiles, warps, stages, aw and whatever else the line names), then printed: the geometric
mean of B / A over the configs both sides timed, split by ``aw``; each problem's best config per side and sweep;
and the Qwen2.5-7B layer (qkv + o + gate_up + down) summed from the best per shape. The spread of A's own sweeps
(the mean |log ratio| of its two timings per config) is the noise to compare a gain with.
"""
from __future__ import annotations

import math
import re
import sys
from typing import Dict, Sequence, Tuple

from bench.common import geomean

CFG = re.compile(r"\s*cfg M=(\d+) (\S+) (.*?) ([\d.]+) us")
BEST = re.compile(r"TIME M=(\d+) (\S+)\s+N=.*best ([\d.]+) us")
LAYER = ("qkv", "o", "gate_up", "down")


def parse(path: str) -> Tuple[Dict[tuple, float], Dict[tuple, float]]:
    """(µs per (batch, shape, config text), best µs per (batch, shape)) of one sweep log."""
    cfgs, best = {}, {}
    for line in open(path):
        if m := CFG.match(line):  # an experiment's new option at its default (csplit=1) is HEAD's config
            cfgs[(int(m[1]), m[2], re.sub(r" csplit=1\b", "", m[3]))] = float(m[4])
        elif m := BEST.match(line):
            best[(int(m[1]), m[2])] = float(m[3])
    return cfgs, best


def mean_of(sweeps: Sequence[Dict[tuple, float]]) -> Dict[tuple, float]:
    keys = set.intersection(*(set(s) for s in sweeps))
    return {k: sum(s[k] for s in sweeps) / len(sweeps) for k in keys}


def report(a_logs: Sequence[str], b_logs: Sequence[str]) -> str:
    a = [parse(p) for p in a_logs]
    b = [parse(p) for p in b_logs]
    ma, mb = mean_of([c for c, _ in a]), mean_of([c for c, _ in b])
    out = []
    for aw in ("aw=0", "aw=1"):
        common = [k for k in ma if k in mb and aw in k[2]]
        g = geomean([mb[k] / ma[k] for k in common])
        out.append(f"B / A per config, {aw}: "
                   + (f"geomean {g:.4f} over {len(common)} configs" if g else "no config in common"))
    only_b = len([k for k in mb if k not in ma])
    if only_b:
        out.append(f"configs only B timed: {only_b} (B's new options)")
    if len(a) > 1:
        k0 = [k for k in a[0][0] if k in a[1][0]]
        spread = sum(abs(math.log(a[0][0][k] / a[1][0][k])) for k in k0) / max(1, len(k0))
        out.append(f"A's own spread: mean |log ratio| of its two sweeps {spread:.4f} over {len(k0)} configs")
    for side, runs in (("A", a), ("B", b)):
        for i, (_, best) in enumerate(runs):
            per_m = []
            for M in sorted({M for M, _ in best}):
                us = [best.get((M, s), math.nan) for s in LAYER]
                per_m.append(f"M={M} layer {sum(us):.2f} (" + " ".join(f"{s} {u:.2f}" for s, u in zip(LAYER, us)) + ")")
            out.append(f"{side} sweep {i + 1}: " + "; ".join(per_m))
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") == 0 or argv.index("--") == len(argv) - 1:
        print("usage: python -m bench.gemv4_ab A_1.log [A_2.log ...] -- B_1.log [B_2.log ...]", file=sys.stderr)
        return 2
    i = argv.index("--")
    print(report(argv[:i], argv[i + 1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
