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
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def time_interleaved(fa, fb, n_inputs: int, warmup: int, iters: int, graph: bool = True) -> dict:
    """Median ms of ``fa`` and ``fb`` and the median of per-pair differences ``fb - fa``, from calls interleaved
    a, b, a, b, ... (call c uses input set c % n_inputs, so with n_inputs > 1 consecutive calls read different
    inputs): CUDA-graph replays, or with ``graph=False`` the eager calls (for steps that take milliseconds, whose
    launches do not count). Adjacent calls share the clock state, so drift cancels in the differences."""
    if graph:
        graphs = [capture_graphs(fa, n_inputs), capture_graphs(fb, n_inputs)]
        fns = [lambda i, g=g: g[i].replay() for g in graphs]
    else:
        fns = [fa, fb]
        for w in range(warmup):
            fa(w % n_inputs)
            fb(w % n_inputs)
    calls = 2 * (warmup + iters)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for c in range(calls):
        fns[c % 2](c % n_inputs)
        events[c + 1].record()
    torch.cuda.synchronize()
    times = [events[c].elapsed_time(events[c + 1]) for c in range(2 * warmup, calls)]
    ta, tb = times[0::2], times[1::2]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"a_ms": med(ta), "b_ms": med(tb), "diff_ms": med([b - a for a, b in zip(ta, tb)])}


def copy_bandwidth_tbps(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s, counting read + write (``2 * nbytes / time``): the ceiling that
    byte floors divide by (bench/NOTES.md, "Ceilings")."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda _: dst.copy_(src), iters=iters)["median_ms"]
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e12


# NVML's clocks-event reasons (nvml.h, ``nvmlClocksEventReason*``): why the SM clock sits below its maximum
POWER_CAP_REASONS = 0x4 | 0x80  # software power cap, hardware power brake
THERMAL_REASONS = 0x20 | 0x40  # software and hardware thermal slowdown

Reading = Tuple[int, float, int, float]  # SM clock MHz, power W, clocks-event reasons, enforced power limit W


def nvml_reader(device=None) -> Optional[Callable[[], Reading]]:
    """A function that reads the GPU's ``Reading`` from NVML (through torch's pynvml handle), or None where NVML
    cannot be read (no pynvml, no driver, a container without it)."""
    try:
        import pynvml
        handle = torch.cuda._get_pynvml_handler(device)
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

        def read() -> Reading:
            return (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                    pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, reasons(handle),
                    pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3)
        read()
        return read
    except Exception:  # noqa: BLE001 - any NVML failure means: no readings
        return None


class GpuSampler:
    """``with GpuSampler() as gpu: ...`` calls ``read()`` (default :func:`nvml_reader`'s; where that is None, nothing
    is read) every ``period_s`` in a background thread while the block runs, each reading stamped with ``clock()``
    (the host's ``time.perf_counter``, so stages timed on the host can select their readings).
    ``summary(since, until)``: the SM clock's min and median, the median power (NVML averages it over its own
    sample period, 1/6 to 1 s), the power limit and the shares of readings whose clocks-event reasons name a power
    cap or a thermal slowdown; empty where there is no reading."""

    def __init__(self, read: Optional[Callable[[], Optional[Reading]]] = None, period_s: float = 0.02,
                 clock: Callable[[], float] = time.perf_counter):
        self.read = nvml_reader() if read is None else read
        self.period_s, self.clock, self.samples = period_s, clock, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.read is not None:
            v = self.read()
            if v is not None:
                self.samples.append((self.clock(), *v))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, since: float = -math.inf, until: float = math.inf) -> Dict[str, float]:
        got = [s for s in self.samples if since <= s[0] <= until]
        if not got:
            return {}
        mhz, watts, reasons, limit = (list(c) for c in zip(*(s[1:] for s in got)))
        share = lambda bits: sum(1 for r in reasons if r & bits) / len(got)  # noqa: E731
        return {"sm_clock_min_mhz": min(mhz), "sm_clock_median_mhz": statistics.median(mhz),
                "power_median_w": statistics.median(watts), "power_limit_w": max(limit),
                "power_capped_share": share(POWER_CAP_REASONS), "thermal_share": share(THERMAL_REASONS),
                "readings": len(got)}


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
