"""Summarize an ncu source page (SASS) per kernel launch: where the warps' stall samples fall.

    ncu --set full --import-source yes -o rep ./probe ...
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python -m bench.ncu_sass_stalls sass.csv [--hot 0.006]

For each launch in the file: the stall reasons' shares of all samples, the instruction mix (executed
instructions by opcode), the samples by opcode, and with ``--hot F`` every instruction holding more than
F of the launch's samples (its three largest stall reasons). Only the opcode's first word counts
(``MUFU.EX2`` -> ``MUFU``; a predicate guard is skipped).
"""
from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def launches(path: str) -> list[dict]:
    """The file's launches: {'name', 'header', 'rows'} in order (a 'Kernel Name' row starts each)."""
    out: list[dict] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                out.append({"name": row[1], "header": None, "rows": []})
            elif row[0] == "Address":
                out[-1]["header"] = row
            elif out:
                out[-1]["rows"].append(row)
    return out


def opcode(sass: str) -> str:
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def summarize(launch: dict, hot: float | None) -> str:
    idx = {k: i for i, k in enumerate(launch["header"])}
    reasons = [k for k in launch["header"] if k.startswith("stall_") and "Not Issued" not in k]
    stalls, mix, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for r in launch["rows"]:
        op = opcode(r[idx["Source"]])
        for k in reasons:
            stalls[k] += int(r[idx[k]] or 0)
        mix[op] += int(r[idx[EXECUTED]] or 0)
        by_op[op] += int(r[idx[SAMPLES]] or 0)
    n, e = max(sum(stalls.values()), 1), max(sum(mix.values()), 1)
    lines = [f"{launch['name']}: {n} samples, {e} instructions",
             "  stalls: " + ", ".join(f"{k[6:]} {v / n:.1%}" for k, v in stalls.most_common(9)),
             "  mix: " + ", ".join(f"{k} {v / e:.1%}" for k, v in mix.most_common(14)),
             "  samples by opcode: " + ", ".join(f"{k} {v / n:.1%}" for k, v in by_op.most_common(12))]
    if hot is not None:
        for i, r in enumerate(launch["rows"]):
            s = int(r[idx[SAMPLES]] or 0)
            if s > hot * n:
                top = sorted(((int(r[idx[k]] or 0), k[6:]) for k in reasons), reverse=True)[:3]
                lines.append(f"  [{i}] {r[idx['Source']].strip()[:64]:64} {s / n:6.2%} x{r[idx[EXECUTED]]} "
                             + " ".join(f"{k} {v}" for v, k in top))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--hot", type=float, default=None, help="list instructions above this share of samples")
    args = p.parse_args()
    for launch in launches(args.csv):
        print(summarize(launch, args.hot))


if __name__ == "__main__":
    main()
