"""Tuned vs default kernel configs per op, over shapes the defaults were and were not swept on.

``python -m bench.autotune [--quick] [--op OP] [--backend B] [--cache PATH] [--lookup] [--against JSON ...]
[--combine JSON ...]``.
Every kernel (``sparsevila_ops.autotune.KERNELS``; the cuda backend's where it can run) is tuned at every shape of
its grid below (>= 20 per op family: head dims 64-256, GQA groups 1-8, batch 1-8, lengths 1k-128k, bf16; W4A16
GEMVs of 7B and 1.5B decoders at batch 1-8) into this run's cache (a temp file unless ``--cache``), then its
default and tuned configs are timed again side by side by ``autotune.measure`` (verified first, then CUDA-graph
replays over rotating inputs, in ``RETIME_ROUNDS`` interleaved rounds whose medians are compared). Rows: default and
tuned µs, speedup, tuning seconds; the JSON also holds every config's trial (status, µs). Per op
(``autotune_summary``): geometric-mean speedup over all shapes and over those the defaults were not swept on, the
worst speedup, the tuning time, and the lookup overhead of one launch on a warm table (``Tunable.config``, µs;
``--lookup``: only that, per kernel, tuning nothing). ``--against``: the defaults earlier runs' rows timed (each
row's first trial) are timed in the same rounds, and ``default_gain`` is how much faster this build's default is.
``--combine``: no GPU; the per-op and overall geomeans over several runs' ``autotune.json``, written beside the last
one (``autotune_combined``).

Targets (H200): tuned never slower than default beyond noise; geomean >= 1.15x on the unswept shapes; lookup
<= 2 µs per call; tuning every shipped shape (``python -m sparsevila_ops.autotune tune --op all``) <= 15 min.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Tuple

import torch

from bench.common import geomean, require_gpu, write_results

SALIENCE_SEGMENTS = ((64, 256), (729, 64), (1024, 16), (4096, 1))  # (tokens per segment, segments)
LLM_HEADS = ((28, 4, 128), (32, 32, 128), (32, 8, 128), (16, 2, 64), (32, 4, 256))  # (Hq, Hk, D)
CONTEXTS = (1024, 8192, 32768, 131072)
# held out of the salience defaults (bench/NOTES.md, "Five more defaults"): 576-token frames (336 px / 14) at D 80,
# 2048-token segments, 300-token frames at D 96
SALIENCE_HELD_OUT = [{"H": 16, "D": 80, "n": 576, "segs": 64}, {"H": 12, "D": 64, "n": 2048, "segs": 8},
                     {"H": 16, "D": 96, "n": 300, "segs": 64}]
RETIME_ROUNDS = 5  # interleaved timings of the default and the tuned config per shape (medians compared)

_DENSE_7B = ((4608, 3584, False, True), (3584, 3584, False, False), (18944, 3584, True, False),
             (3584, 18944, False, False))  # (N, K, glu, bias)
_DENSE_OTHER = ((12288, 4096, False, False), (4096, 4096, False, False), (11008, 4096, True, False),
                (4096, 11008, False, False), (2048, 1536, False, True), (8960, 1536, True, False),
                (1536, 8960, False, False))

GRID = {
    "visual_salience.lse": [{"H": 16, "D": d, "n": n, "segs": s} for d in (64, 72, 80, 96, 128)
                            for n, s in SALIENCE_SEGMENTS] + SALIENCE_HELD_OUT,
    "visual_salience.colsum": [{"H": 16, "D": d, "n": n, "segs": s} for d in (64, 72, 80, 96, 128)
                               for n, s in SALIENCE_SEGMENTS] + SALIENCE_HELD_OUT,
    "prefill_attention": [{"Hq": hq, "Hk": hk, "D": d, "n": n} for hq, hk, d in LLM_HEADS[:4]
                          for n in (1024, 4096, 16384)]
                         + [{"Hq": 32, "Hk": 4, "D": 256, "n": n} for n in (1024, 4096)]
                         + [{"Hq": 16, "Hk": 16, "D": 80, "n": n, "segs": s, "causal": False}
                            for n, s in ((64, 256), (784, 16), (4096, 1), (16384, 1))]
                         + [{"Hq": 28, "Hk": 4, "D": 128, "n": 1024, "segs": 8},
                            {"Hq": 24, "Hk": 8, "D": 96, "n": 4096}]
                         # held out of the prefill default: 128-row tiles give 128 / 256 / 768 programs
                         + [{"Hq": 8, "Hk": 1, "D": 64, "n": 2048}, {"Hq": 16, "Hk": 16, "D": 80, "n": 2048,
                            "causal": False}, {"Hq": 12, "Hk": 2, "D": 64, "n": 8192}],
    "kv_relevance": [{"Hq": hq, "Hk": hk, "D": d, "rows": m, "n": n} for hq, hk, d in LLM_HEADS
                     for m, n in ((64, 8192), (256, 32768), (512, 4096), (128, 131072))]
                    # held out of the relevance default: D 256 elsewhere, 2048 and 384 programs of 128 keys, 32 rows
                    + [{"Hq": 32, "Hk": 4, "D": 256, "rows": 128, "n": 16384},
                       {"Hq": 28, "Hk": 4, "D": 128, "rows": 200, "n": 65536},
                       {"Hq": 32, "Hk": 8, "D": 128, "rows": 384, "n": 6144},
                       {"Hq": 16, "Hk": 2, "D": 64, "rows": 32, "n": 16384}],
    "select_kv": [{"L": L, "Hk": hk, "n": n} for L, hk in ((28, 4), (32, 32), (32, 8), (24, 2)) for n in CONTEXTS]
                 + [{"L": L, "Hk": hk, "B": b, "n": n} for L, hk, b in ((28, 4, 4), (32, 8, 8)) for n in (8192, 32768)]
                 # held out of the select default: rows of T = n + 128 just above a power of two
                 + [{"L": 28, "Hk": 4, "n": 2000}, {"L": 32, "Hk": 8, "n": 480}, {"L": 32, "Hk": 32, "n": 2000}],
    "pack_kv": [{"L": L, "Hk": hk, "D": d, "n": n} for L, hk, d in ((28, 4, 128), (32, 8, 128), (28, 4, 64))
                for n in (4096, 32768, 131072)]
               + [{"L": 32, "Hk": 32, "D": 128, "n": n, "keep": k} for n in (4096, 32768) for k in (0.05, 0.3)]
               + [{"L": 28, "Hk": 4, "D": 128, "n": n, "keep": k}
                  for n, k in ((32768, 0.15), (32768, 0.3), (131072, 0.3))]
               + [{"L": L, "Hk": hk, "D": 128, "B": b, "n": n} for L, hk, b in ((28, 4, 4), (32, 8, 2))
                  for n in (8192, 32768)],
    "decode_attention": [{"Hq": hq, "Hk": hk, "D": d, "n": n} for hq, hk, d in LLM_HEADS for n in CONTEXTS]
                        + [{"Hq": 28, "Hk": 4, "D": 128, "B": b, "n": 32768} for b in (2, 4, 8)],
    "visual_salience": [{"H": 16, "D": d, "n": n, "segs": s, "lse_given": given} for d in (64, 72, 80, 128)
                        for n, s in SALIENCE_SEGMENTS for given in (False, True)],
    "sparse_decode_attention": [{"Hq": hq, "Hk": hk, "D": d, "T": n, "n": n // 20} for hq, hk, d in LLM_HEADS
                                for n in (8192, 32768, 131072)]
                               + [{"Hq": 28, "Hk": 4, "D": 128, "B": b, "T": 32768, "n": 1638} for b in (2, 4, 8)]
                               + [{"Hq": 28, "Hk": 4, "D": 128, "T": 32768, "n": n} for n in (4915, 9830)]
                               + [{"Hq": 28, "Hk": 4, "D": 128, "T": 131072, "n": n} for n in (1311, 19661, 39322)],
    "append_kv": [{"Hk": hk, "D": d, "B": b, "cap": 8448} for hk, d in ((4, 128), (32, 128), (8, 64), (2, 256),
                                                                         (16, 80)) for b in (1, 2, 4, 8)],
    "rope_append_kv": [{"Hq": hq, "Hk": hk, "D": d, "B": b, "cap": 8448} for hq, hk, d in LLM_HEADS
                       for b in (1, 2, 4, 8)],
    # Qwen2.5-7B's fused qkv / o / gate_up / down at batches 1-8, Llama-2-7B's and a 1.5B model's at 1 and 8, group 256
    "w4a16_linear": [{"M": m, "N": n, "K": k} for n, k in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944))
                     for m in (1, 2, 4, 8)]
                    + [{"M": m, "N": n, "K": k} for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008),
                                                             (2048, 1536), (256, 1536), (1536, 8960)) for m in (1, 8)]
                    + [{"M": m, "N": 4608, "K": 3584, "group": 256} for m in (1, 8)],
    # dense GEMVs as the integration runs them (fused qkv with bias, o, gate/up emitting silu(gate) * up, down):
    # Qwen2.5-7B at batches 1-8, Llama-2-7B and Qwen2.5-1.5B at 1 and 8
    "gemv": [{"M": m, "N": n, "K": k, "glu": glu, "bias": bias} for n, k, glu, bias in _DENSE_7B for m in (1, 2, 4, 8)]
            + [{"M": m, "N": n, "K": k, "glu": glu, "bias": bias} for n, k, glu, bias in _DENSE_OTHER for m in (1, 8)],
}


def swept(op: str, s: dict) -> bool:
    """Whether the default was tuned at this shape (the H100 sweeps of bench/NOTES.md): Qwen2-7B / Llama-2-7B
    decoders at batch 1, the SigLIP and QwenVL salience shapes; select, pack, append and the W4A16 and dense GEMVs
    were never swept."""
    llm = (s.get("Hq"), s.get("Hk"), s.get("D")) in ((28, 4, 128), (32, 32, 128)) and s.get("B", 1) == 1
    if op in ("decode_attention", "sparse_decode_attention", "prefill_attention", "kv_relevance"):
        return llm and s["n"] >= 8192
    if op.startswith("visual_salience"):
        return s["D"] in (72, 80) and (s["n"], s["segs"]) in ((729, 64), (4096, 1))
    return False


def lookup_us(tunable, args, calls: int = 20000, repeats: int = 5) -> float:
    """Host time of one launch's config lookup on a warm table (the exact key already memoized), µs: the best of
    ``repeats`` loops of ``calls`` (a loop that another thread or process interrupts reads high)."""
    tunable.config(args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            tunable.config(args)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def earlier_defaults(paths) -> dict:
    """``{(op, shape): config}``: the default each row of earlier runs' ``autotune.json`` timed (its first trial),
    for ``--against``; a later file replaces an earlier one's rows."""
    out = {}
    for path in paths:
        with open(path) as f:
            out.update({(r["op"], r["shape"]): r["trials"][0]["config"] for r in json.load(f)["rows"]
                        if r.get("trials")})
    return out


def run(ops, quick: bool, done=None, against=None, backends=None):
    """Rows and per-op summaries; ``done(rows, summary)`` gets both so far after each op. ``against``
    (:func:`earlier_defaults`): each shape's earlier default is timed in the same interleaved rounds, and the row
    gets its µs and ``default_gain`` (earlier default / this default). ``backends``: only these (default: all)."""
    from sparsevila_ops import autotune
    rows, summary = [], []
    kernels = [(op, b) for op, b in autotune.KERNELS if op in ops and (not backends or b in backends)]
    for op, backend in kernels:
        t = autotune.kernel(op, backend)
        grid = GRID[op][:3] if quick else GRID[op]
        op_rows, tune_s, lookup = [], 0.0, None
        for shape in grid:
            args = autotune.make_args(op, shape, "cuda")
            if t.unsupported(*args) is not None:  # e.g. the cuda backend off Hopper, or a head dim it lacks
                continue
            desc = ",".join(f"{k}={v}" for k, v in shape.items())
            try:
                r = autotune.tune(op, args, backend=backend)
                # the default and the tuned config, timed in RETIME_ROUNDS interleaved rounds: one timing each
                # read 0.61x at a shape where tune's own interleaved confirmation had the winner 7 % faster
                earlier = (against or {}).get((t.name, desc))
                again = autotune.measure(op, args, [r.config] + ([earlier] if earlier else []), backend=backend,
                                         rounds=RETIME_ROUNDS)
                bad = [x for x in again if x.status != "ok"]
                if bad:
                    raise RuntimeError(f"re-timing: {bad[0].config} {bad[0].status} {bad[0].note}")
            except Exception as e:  # noqa: BLE001 - a shape that fails (memory, no valid config) is reported
                print(f"FAILED {t.name} {desc}: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            ms = {json.dumps(x.config, sort_keys=True): x.final_ms for x in again}
            default_ms, tuned_ms = again[0].final_ms, ms[json.dumps(r.config, sort_keys=True)]
            tune_s += r.seconds
            op_rows.append({"op": t.name, "shape": desc, "swept": swept(op, shape), "default_us": 1e3 * default_ms,
                            "tuned_us": 1e3 * tuned_ms, "speedup": default_ms / tuned_ms, "tune_s": r.seconds,
                            "config": "default" if r.config == again[0].config else str(r.config)})
            if earlier:
                earlier_ms = ms[json.dumps(earlier, sort_keys=True)]
                op_rows[-1].update(earlier_us=1e3 * earlier_ms, default_gain=earlier_ms / default_ms)
            print(op_rows[-1], flush=True)
            # every config the tuner tried (the default first), for reading how far a fixed rule is from the best
            op_rows[-1]["trials"] = [{"config": x.config, "status": x.status,
                                      "us": None if x.ms is None else 1e3 * x.ms} for x in r.trials]
            if lookup is None:  # once per op: the lookup is one dict hit whatever the shape
                lookup = lookup_us(t, args)
            del args, r, again
            torch.cuda.empty_cache()
        if not op_rows:
            continue
        rows += op_rows
        speedups = [r["speedup"] for r in op_rows]
        summary.append({"op": t.name, "shapes": len(op_rows), "geomean": geomean(speedups),
                        "geomean_unswept": geomean([r["speedup"] for r in op_rows if not r["swept"]]),
                        "worst": min(speedups), "tune_s": tune_s, "lookup_us": lookup})
        gains = [r["default_gain"] for r in op_rows if "default_gain" in r]
        if gains:
            summary[-1].update(default_gain=geomean(gains), default_gain_worst=min(gains))
        print(summary[-1], flush=True)
        if done is not None:
            done(rows, summary)
    return rows, summary


def lookups(ops, device: str = "cuda", grid=None) -> list:
    """``lookup_us`` of every kernel of ``ops`` at the first shape of its ``grid`` (default ``GRID``) it can run,
    tuning nothing (the lookup chain finds the shipped table or the default, then the memo)."""
    from sparsevila_ops import autotune
    out = []
    for op, backend in autotune.KERNELS:
        if op not in ops:
            continue
        t = autotune.kernel(op, backend)
        for shape in (grid or GRID)[op]:
            args = autotune.make_args(op, shape, device)
            if t.unsupported(*args) is None:
                out.append({"op": t.name, "shape": ",".join(f"{k}={v}" for k, v in shape.items()),
                            "lookup_us": lookup_us(t, args)})
                print(out[-1], flush=True)
                break
    return out


def combine(paths) -> Tuple[list, dict]:
    """Per-op summaries and the overall one (``op`` "all") over the rows of ``autotune.json`` files of several runs;
    an op's rows come from the last file that has it (a later run of an op replaces its earlier rows)."""
    by_op = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for op in dict.fromkeys(r["op"] for r in rows):
            by_op[op] = [r for r in rows if r["op"] == op]

    def summarize(op, rows):
        speedups = [r["speedup"] for r in rows]
        unswept = [r["speedup"] for r in rows if not r["swept"]]
        return {"op": op, "shapes": len(rows), "unswept": len(unswept), "geomean": geomean(speedups),
                "geomean_unswept": geomean(unswept) if unswept else None, "worst": min(speedups)}
    per_op = [summarize(op, rows) for op, rows in sorted(by_op.items())]
    return per_op, summarize("all", [r for rows in by_op.values() for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the first 3 shapes of each op")
    p.add_argument("--op", action="append", choices=sorted(GRID), help="only these ops (repeatable)")
    p.add_argument("--cache", help="the cache to tune into (default: a temp file; never the user cache)")
    p.add_argument("--lookup", action="store_true", help="only the warm lookup µs of every kernel (no tuning)")
    p.add_argument("--backend", action="append", choices=("triton", "cuda"), help="only these backends (repeatable)")
    p.add_argument("--against", nargs="+", metavar="JSON",
                   help="also time the defaults earlier runs' autotune.json timed (a later file's rows win)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="no GPU: summarize the rows of these runs' autotune.json (later files replace an op's rows)")
    a = p.parse_args(argv)
    if a.combine:
        per_op, overall = combine(a.combine)
        write_results("autotune_combined", per_op + [overall],
                      ["op", "shapes", "unswept", "geomean", "geomean_unswept", "worst"],
                      out_dir=os.path.dirname(os.path.abspath(a.combine[-1])),
                      title="autotune: per op and overall over " + ", ".join(map(os.path.basename, a.combine)))
        return 0
    if not require_gpu("bench.autotune"):
        return 0
    from sparsevila_ops import autotune
    if a.lookup:
        write_results("autotune_lookup", lookups(a.op or sorted(GRID)), ["op", "shape", "lookup_us"],
                      title="autotune: warm lookup per launch")
        return 0
    os.environ["SPARSEVILA_AUTOTUNE_CACHE"] = a.cache or os.path.join(tempfile.mkdtemp(), "autotune.json")
    autotune.reset()
    def write(rows, summary):
        extra = ["earlier_us", "default_gain"] if a.against else []
        write_results("autotune", rows, ["op", "shape", "swept", "default_us", "tuned_us", "speedup", "tune_s",
                                         "config"] + extra, title="autotune: tuned vs default per shape")
        write_results("autotune_summary", summary, ["op", "shapes", "geomean", "geomean_unswept", "worst", "tune_s",
                                                    "lookup_us"] + (["default_gain", "default_gain_worst"]
                                                                    if a.against else []), title="autotune: per op")
    run(a.op or sorted(GRID), a.quick, done=write, against=earlier_defaults(a.against) if a.against else None,
        backends=a.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
