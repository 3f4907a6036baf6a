"""Shared benchmark utilities: CUDA-event timing, verification before timing, result writers.

Method: warm-up, rotating input sets (so repeated runs do not measure L2), CUDA-event medians
with p20/p80, outputs verified against the reference before any timing, and every result file stamped with
GPU name, versions and git commit. Scripts use ``time_cuda`` + ``write_results``; pytest-benchmark users can
wrap ``time_cuda`` via ``pedantic_cuda``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from sparsevila_ops.testing import rel_err

RESULTS = Path(__file__).resolve().parent / "results"


def require_gpu(name: str) -> bool:
    """True when a CUDA GPU is present; else prints ``<name>: needs a CUDA GPU; skipped`` and returns False, so
    a benchmark's ``main`` returns 0 on a CPU-only machine instead of failing inside CUDA calls."""
    if torch.cuda.is_available():
        return True
    print(f"{name}: needs a CUDA GPU; skipped")
    return False


def verify(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Relative L2 error ``||out - ref|| / ||ref||``; raises if above ``tol`` or non-finite where ref is."""
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}: refusing to time a wrong kernel")
    return err


def geomean(xs: Sequence[float]) -> Optional[float]:
    """Geometric mean of positive ratios (None for none)."""
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def capture_graphs(fn: Callable[[int], object], n_inputs: int) -> List["torch.cuda.CUDAGraph"]:
    """One CUDA graph per input set of ``fn(i)``, after a warm-up call per set on a side stream (JIT compiles
    and allocator growth happen outside capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_inputs):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for i in range(n_inputs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return graphs


def replay_in_graph(step: Callable[[], object], replays: int = 3) -> None:
    """Run ``step`` once eagerly (JIT compiles), capture it in one CUDA graph and replay that ``replays`` times:
    for tools that read what the kernels recorded during a steady-state replay (timelines)."""
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()


def time_cuda(fn: Callable[[int], object], *, n_inputs: int = 1, warmup: int = 5, iters: int = 50,
              graph: bool = False) -> Dict[str, float]:
    """Time ``fn(i)`` (i = index of the rotating input set) with CUDA events; returns ms stats.

    With ``graph=True`` the ``n_inputs`` calls are captured into one CUDA graph per input set and replays are
    timed (launch overhead removed, as in a CUDA-graph decode loop).
    """
    if graph:
        graphs = capture_graphs(fn, n_inputs)
        call = lambda i: graphs[i].replay()  # noqa: E731
    else:
        call = fn
    for w in range(warmup):
        call(w % n_inputs)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for it in range(iters):
        starts[it].record()
        call(it % n_inputs)
        ends[it].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8), "iters": iters}


def copy_bandwidth_tbps(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s, counting read + write (``2 * nbytes / time``): the ceiling that
    byte floors divide by (bench/NOTES.md, "Ceilings")."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda _: dst.copy_(src), iters=iters)["median_ms"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e12


def peak_extra_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated by ``fn`` above what was allocated before it (CUDA caching allocator peak)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def pedantic_cuda(benchmark, fn: Callable[[], object], rounds: int = 20) -> None:
    """Run ``fn`` under pytest-benchmark with a synchronize after each call (wall clock around the GPU)."""
    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=3)


def env_meta() -> Dict[str, object]:
    """GPU name, versions and git commit stamped on every result file."""
    import importlib
    meta: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        meta["triton"] = importlib.import_module("triton").__version__
    except ImportError:
        meta["triton"] = None
    meta["commit"] = os.environ.get("GIT_COMMIT") or git_commit()
    return meta


def git_commit() -> Optional[str]:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files differ from it (a copied working tree
    whose ``.git`` is older than its files reads as dirty, not as the old commit); None without git."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=20).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_slug(meta: Dict[str, object]) -> str:
    name = str(meta["gpu"]).lower()
    for key in ("h100", "h200", "a100", "l40", "b200"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "_" for c in name)[:32]


def markdown_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: List[Dict[str, object]], columns: Sequence[str], *,
                  plot: Optional[Callable[[object], None]] = None, out_dir: Optional[str] = None,
                  title: str = "") -> Path:
    """Write ``<name>.json``, ``<name>.md`` (and ``<name>.png`` when ``plot(ax_or_fig)`` is given).

    Directory: ``out_dir``, else ``$SPARSEVILA_BENCH_DIR`` (set by gpu_check.sh), else ``bench/results/<gpu>/``.
    Prints the markdown table last.
    """
    meta = env_meta()
    d = Path(out_dir or os.environ.get("SPARSEVILA_BENCH_DIR") or RESULTS / gpu_slug(meta))
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = f"# {title or name}\n\n{meta}\n\n" + markdown_table(rows, columns) + "\n"
    (d / f"{name}.md").write_text(md)
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure(figsize=(11, 4.5))
        plot(fig)
        fig.suptitle(f"{title or name} — {meta['gpu']}, commit {meta['commit']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(d / f"{name}.png", dpi=110)
        plt.close(fig)
    print(markdown_table(rows, columns))
    return d
