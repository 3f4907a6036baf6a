"""Figure 3 of the paper: (a) query-agnostic salience, (b) query-aware relevance (+ prefill vs SDPA).

``python -m bench.figure3 [--quick] [--part a|b]``; each part writes its own JSON/markdown/PNG.
"""
import argparse

from bench import figure3_relevance, figure3_salience


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    extra = ["--quick"] if a.quick else []
    rc = 0
    if a.part in ("a", "both"):
        rc |= figure3_salience.main(extra) or 0
    if a.part in ("b", "both"):
        rc |= figure3_relevance.main(extra) or 0
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
