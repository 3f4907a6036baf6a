"""Tuned kernel configs from the command line: ``python -m sparsevila_ops.autotune <command>`` (also
``python -m sparsevila_ops autotune <command>``).

- ``tune --op OP|all [--backend triton|cuda|all] [--shapes PRESET|FILE] [--jobs N] [--retune]``: tune every
  kernel of OP at every shape of the preset or file into the user cache (shapes that fall in a bucket tuned in
  this run, or already held by the user cache unless ``--retune``, are skipped: an interrupted run resumes),
  compiling each key's candidates on N threads first; a progress bar with an ETA on stderr. Needs a CUDA GPU.
- ``show [--op OP]``: the user cache and the shipped tables, and whether this install uses them.
- ``clear [--op OP]``: remove the user cache's entries (all, or OP's).
- ``export [--gpu NAME] [--out PATH]``: write the user cache's table of a GPU in the shipped format (default
  ``autotune/configs/<gpu>.json``, package data).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import KERNELS, kernel, shapes, tables
from .tuner import JOBS

OPS = sorted({op for op, _ in KERNELS})


class Progress:
    """A ``[####------] i/n  label  elapsed, ETA`` line on stderr, redrawn in place on a terminal (one line per
    step otherwise)."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream, self.t0 = total, stream or sys.stderr, time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, done: int, label: str) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - done) if done else None
        bar = "#" * (20 * done // max(self.total, 1))
        return (f"[{bar:<20}] {done}/{self.total}  {label}  {_clock(elapsed)} elapsed, ETA "
                f"{_clock(eta) if eta is not None else '?'}")

    def update(self, done: int, label: str) -> None:
        text = self.line(done, label)
        self.stream.write(f"\r\x1b[K{text}" if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _describe(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _selected(op: str, backend: str) -> List[tuple]:
    return [(o, b) for o, b in KERNELS if (op == "all" or o == op) and (backend == "all" or b == backend)]


def cmd_tune(a) -> int:
    if not torch.cuda.is_available():
        print("autotune tune: needs a CUDA GPU (none found here); nothing was tuned", file=sys.stderr)
        return 2
    try:
        work = shapes.load(a.shapes)
    except ValueError as e:
        print(f"autotune tune: {e}", file=sys.stderr)
        return 2
    selected = _selected(a.op, a.backend)
    jobs = [(op, backend, shape) for op, shape in work for o, backend in selected if o == op]
    if not jobs:
        print(f"autotune tune: no shape of {a.shapes!r} is for {a.op}/{a.backend}", file=sys.stderr)
        return 2
    from .problems import make_args
    from .tuner import tune
    done, failed, resumed, skipped, progress = set(), 0, 0, {}, Progress(len(jobs))
    for i, (op, backend, shape) in enumerate(jobs):
        t = kernel(op, backend)
        progress.update(i, f"{t.name} {_describe(shape)}")
        args = make_args(op, shape, "cuda")
        key = t.key(*args)
        if (t.name, t.table_key(key)) in done:
            continue
        why = t.unsupported(*args)
        if why is not None:  # the kernel cannot run this shape here: skipped, each reason said once
            if (t.name, why) not in skipped:
                print(f"\nskipping {t.name} {_describe(shape)}: {why}", file=sys.stderr)
            skipped[t.name, why] = skipped.get((t.name, why), 0) + 1
            continue
        done.add((t.name, t.table_key(key)))
        if not a.retune and tables.user_has(t, key):  # an interrupted run resumes where it stopped
            resumed += 1
            continue
        try:
            r = tune(t, args, jobs=a.jobs)
        except Exception as e:  # noqa: BLE001 - report the shape and go on with the others
            failed += 1
            print(f"\nFAILED {t.name} {_describe(shape)}: {type(e).__name__}: {e}"[:400], file=sys.stderr)
            continue
        finally:
            del args
            torch.cuda.empty_cache()
        gain = f"x{r.default_ms / r.ms:.2f} over the default" if r.default_ms else "the default fails"
        print(f"\n{t.name} {t.table_key(key)}: {r.config} {1e3 * r.ms:.1f} us, {gain} ({r.seconds:.0f} s)",
              file=sys.stderr)
    progress.update(len(jobs), "done")
    progress.close()
    if skipped and not done:
        print("autotune tune: no selected kernel can run any of these shapes here: "
              + "; ".join(f"{name}: {why}" for name, why in skipped), file=sys.stderr)
        return 2
    print(f"tuned {len(done) - failed - resumed} keys ({failed} failed, {resumed} already in the cache, "
          f"{sum(skipped.values())} shapes skipped) into {tables.cache_path()}")
    return 1 if failed else 0


def _show_table(table: dict, op: Optional[str]) -> None:
    gpu = table.get("meta", {}).get("gpu", "?")
    why = tables.usable(table, gpu)
    print(f"  {gpu}: {table.get('meta')}: {'used by this install' if why is None else 'ignored: ' + why}")
    for name, section in sorted(table.get("kernels", {}).items()):
        o, backend = name.split("/")
        if op not in (None, o):
            continue
        if (o, backend) not in KERNELS:
            note = "; ignored: no such kernel in this version"
        elif section.get("source") != kernel(o, backend).source_hash:
            note = "; ignored: the kernel source changed"
        else:
            note = ""
        print(f"    {name} ({len(section.get('entries', {}))} entries{note})")
        for k, e in sorted(section.get("entries", {}).items()):
            print(f"      {k}: {e['config']}  {e['us']} us (default {e.get('default_us')} us)")


def cmd_show(a) -> int:
    print(f"user cache {tables.cache_path()}:")
    for table in tables.user_tables().values():
        _show_table(table, a.op)
    print(f"shipped tables {tables.SHIPPED_DIR}:")
    for table in tables.shipped_tables().values():
        _show_table(table, a.op)
    return 0


def cmd_clear(a) -> int:
    n = tables.clear(a.op)
    print(f"removed {n} entries from {tables.cache_path()}")
    return 0


def cmd_export(a) -> int:
    gpu = a.gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    if gpu is None:
        print("autotune export: no CUDA GPU here: name the GPU whose table to export with --gpu", file=sys.stderr)
        return 2
    try:
        path = tables.export(gpu, a.out)
    except ValueError as e:
        print(f"autotune export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsevila_ops.autotune",
                                description="Tune, show, clear and export the per-GPU tables of kernel configs.",
                                epilog="Environment: SPARSEVILA_AUTOTUNE=1 tunes missing keys on their first launch; "
                                       "SPARSEVILA_AUTOTUNE_CACHE moves the user cache.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="tune kernels at the shapes of a preset or file (needs a CUDA GPU)")
    t.add_argument("--op", required=True, choices=OPS + ["all"])
    t.add_argument("--backend", default="all", choices=["triton", "cuda", "all"])
    t.add_argument("--shapes", default="all", metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(shapes.PRESETS)}) or a JSON list of {{\"op\": OP, <shape fields>}} "
                        f"(default: all)")
    t.add_argument("--jobs", type=int, default=JOBS, metavar="N",
                   help=f"threads that compile a key's candidate configs before they are timed (default: one per "
                        f"CPU, at most 32: {JOBS}; 1: each compiles at its first launch)")
    t.add_argument("--retune", action="store_true",
                   help="tune keys the user cache already holds again (default: skip them, so an interrupted run "
                        "resumes)")
    t.set_defaults(run=cmd_tune)
    s = sub.add_parser("show", help="the user cache and the shipped tables")
    s.add_argument("--op", choices=OPS)
    s.set_defaults(run=cmd_show)
    c = sub.add_parser("clear", help="remove the user cache's entries")
    c.add_argument("--op", choices=OPS)
    c.set_defaults(run=cmd_clear)
    e = sub.add_parser("export", help="write a GPU's table in the shipped format")
    e.add_argument("--gpu", help="the GPU name as torch reports it (default: this machine's GPU)")
    e.add_argument("--out", help="the file to write (default: autotune/configs/<gpu>.json in the package)")
    e.set_defaults(run=cmd_export)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return a.run(a)
