"""The tuner: time every config of a kernel's space on one problem; keep the fastest correct one.

For each candidate (the default first, then the space, without duplicates):

1. pruned, without a launch, when its estimated shared memory or registers (``Tunable.resources``) exceed the
   GPU's :class:`Limits`; the others are first compiled together on ``jobs`` threads
   (:meth:`Tunable.precompile`; Triton kernels on a GPU), where each would otherwise compile at its first launch;
2. the arguments the launcher writes (``Problem.outputs``) of every input set are restored from one snapshot,
   so accumulating outputs and in-place updates (``append_kv``'s lengths) start every trial from one state;
3. launched once on input set 0 and compared with the reference's outputs (floats: relative L2 error within
   ``REL_TOL`` of the inputs' dtype; integers: equal); a config that fails to launch or is wrong is rejected,
   never timed;
4. timed by ``timer(run, n_sets)`` (ms per call; ``run(i)`` launches on input set ``i``). Rotating input sets
   (copies of the first, enough to exceed twice the L2 cache) keep repeated calls from reading L2. The default
   timer, :func:`cuda_timer`, replays a CUDA graph of one call per set and takes the median of CUDA-event times
   after warm-up: 20 replays, fewer for calls so long that 20 would exceed ``TIME_BUDGET_MS`` (at least 3).

The fastest correct config wins, but replaces the default only when at least ``MIN_GAIN`` faster (so noise never
swaps a heuristic for an equal config), and then only if a confirmation agrees: the default and the winner are timed
again ``CONFIRM_ROUNDS`` times, interleaved (which goes first alternates), and the winner is kept when the median
of its times is still ``MIN_GAIN`` below the default's. The confirmation times are kept in ``Trial.confirm_ms``
and the result's ``ms`` and ``default_ms`` are their medians. When the default wins the trials, nothing is timed
again.
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sparsevila_ops._device import smem_per_block
from sparsevila_ops.testing import REL_TOL, rel_err

from . import tables
from .tunable import Tunable

MIN_GAIN = 0.02
CONFIRM_ROUNDS = 3
MAX_SETS = 8
TIME_BUDGET_MS = 300.0  # per timing of a candidate (cuda_timer's budget_ms)
MIN_ITERS = 3  # timed replays, however long
JOBS = min(32, os.cpu_count() or 1)  # compile threads: one per CPU, at most 32
FROM_DEVICE = "the device's"
OK, PRUNED, FAILED, WRONG = "ok", "pruned", "failed", "wrong"

Timer = Callable[[Callable[[int], None], int], float]


@dataclass(frozen=True)
class Limits:
    """What one program may use on a GPU: shared memory (opt-in maximum per block) and registers per thread."""
    smem_bytes: int
    regs_per_thread: int = 255


@dataclass
class Trial:
    config: dict
    status: str  # OK, PRUNED, FAILED or WRONG
    ms: Optional[float] = None  # per call, for OK
    err: Optional[float] = None  # largest relative error over the float outputs
    note: str = ""
    confirm_ms: List[float] = field(default_factory=list)  # tune's confirmation or measure's rounds, one per round

    @property
    def final_ms(self) -> Optional[float]:
        """The median of the confirmation times where there are some, else ``ms``."""
        return statistics.median(self.confirm_ms) if self.confirm_ms else self.ms


@dataclass
class Result:
    tunable: Tunable
    key: tuple
    config: dict
    ms: float  # the config's Trial.final_ms
    default_ms: Optional[float]  # the default's Trial.final_ms; None when the default itself failed
    trials: List[Trial] = field(default_factory=list)
    seconds: float = 0.0


def device_limits(device: torch.device) -> Optional[Limits]:
    """The limits of ``device``'s GPU (None on the CPU: the interpreter has none)."""
    if device.type != "cuda":
        return None
    return Limits(smem_per_block(device))


def prune_reason(tunable: Tunable, key, config: dict, limits: Optional[Limits]) -> Optional[str]:
    """Why ``config`` cannot fit (None: it may). Estimates, so a config that passes may still fail to launch."""
    if limits is None or tunable.resources is None:
        return None
    smem, regs = tunable.resources(key, config)
    if smem > limits.smem_bytes:
        return f"~{smem // 1024} KB shared memory > {limits.smem_bytes // 1024} KB"
    if regs > limits.regs_per_thread:
        return f"~{regs} registers per thread > {limits.regs_per_thread}"
    return None


def candidates(tunable: Tunable, key, configs: Optional[Sequence[dict]] = None) -> List[dict]:
    """The default, then ``configs`` (default: the space; complete configs), without repeats."""
    out = [tunable.default(key)]
    for c in tunable.space(key) if configs is None else configs:
        if c not in out:
            out.append(dict(c))
    return out


def _tensors(arg) -> List[torch.Tensor]:
    if isinstance(arg, torch.Tensor):
        return [arg]
    if isinstance(arg, (list, tuple)):
        return [t for t in arg if isinstance(t, torch.Tensor)]
    return []


def clone_args(args: tuple) -> tuple:
    """A deep copy of ``args`` that keeps their aliasing: tensors sharing a storage (layer views of one stacked
    cache, q and k views of a fused QKV) stay views of one cloned storage, with the same offsets and strides."""
    storages = {}

    def clone(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        copy = storages.get(s.data_ptr())
        if copy is None:
            copy = storages[s.data_ptr()] = s.clone()
        return t.new_empty(0).set_(copy, t.storage_offset(), t.size(), t.stride())

    return tuple(clone(a) if isinstance(a, torch.Tensor)
                 else type(a)(clone(t) for t in a) if isinstance(a, (list, tuple)) and _tensors(a) else a
                 for a in args)


def _device(args: tuple) -> torch.device:
    return next(t for a in args for t in _tensors(a)).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_sets(args: tuple) -> int:
    """Input sets to rotate: enough copies that they exceed twice the L2 cache (1 on the CPU), at most MAX_SETS."""
    device = _device(args)
    if device.type != "cuda":
        return 1
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for a in args for t in _tensors(a)}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_SETS, math.ceil(2 * l2 / max(1, sum(storages.values())))))


def replays_within(first_ms: float, warmup: int, iters: int, budget_ms: Optional[float]) -> Tuple[int, int]:
    """(warm-up replays after the first, timed replays) for a replay that took ``first_ms``: ``warmup - 1`` and
    ``iters``, or with ``budget_ms`` as many as fit in it, but at least ``MIN_ITERS`` timed ones (a 250 ms prefill
    is timed 3 times, not 20: its run-to-run spread is far below the tuner's ``MIN_GAIN``)."""
    if budget_ms is None:
        return warmup - 1, iters
    fit = int(budget_ms // max(first_ms, 1e-9))
    timed = max(MIN_ITERS, min(iters, fit))
    return (warmup - 1 if fit >= warmup - 1 + timed else 0), timed


def cuda_timer(run: Callable[[int], None], n_sets: int, *, warmup: int = 3, iters: int = 20,
               budget_ms: Optional[float] = None) -> float:
    """Median ms per call: one CUDA graph runs every input set once and is replayed ``warmup`` + ``iters`` times
    with CUDA events around each replay (with ``budget_ms``: fewer for long replays, ``replays_within``). A launch
    that cannot be captured (a host-to-device copy) is timed as eager calls instead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # JIT compiles and allocator growth happen outside capture
        for i in range(n_sets):
            run(i)
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n_sets):
                run(i)
        step = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()

        def step():
            for i in range(n_sets):
                run(i)
    first = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    first[0].record()
    step()  # the first warm-up replay, timed to size the rest
    first[1].record()
    first[1].synchronize()
    warmup, iters = replays_within(first[0].elapsed_time(first[1]), warmup, iters, budget_ms)
    for _ in range(warmup):
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] / n_sets


def default_timer(device: torch.device) -> Timer:
    """:func:`cuda_timer` within ``TIME_BUDGET_MS`` per timing."""
    if device.type != "cuda":
        raise ValueError("timing needs a CUDA device; pass timer= to time elsewhere")
    return functools.partial(cuda_timer, budget_ms=TIME_BUDGET_MS)


def measure(tunable: Tunable, args: tuple, configs: Optional[Sequence[dict]] = None, *, problem=None,
            timer: Optional[Timer] = None, sets: Optional[int] = None, limits=FROM_DEVICE,
            copy: bool = False, jobs: int = JOBS, rounds: int = 0) -> List[Trial]:
    """Verify and time each of :func:`candidates` on ``args`` (module docstring). ``copy``: work on copies of
    ``args`` (else input set 0 is ``args`` itself and its outputs are overwritten). ``limits``: by default those
    of the arguments' GPU; None prunes nothing. ``jobs``: threads that compile the candidates before the first
    launch (1: each compiles at its first launch). ``rounds`` > 0: the correct configs are then timed ``rounds``
    more times, interleaved (:func:`_time_again`), into ``Trial.confirm_ms``, so
    ``Trial.final_ms`` compares configs on the medians of one shared stretch of time rather than on one timing
    each (a clock or neighbour change between two single timings reads as a speed difference). Raises ValueError,
    with the reason, when the Tunable says it cannot run ``args`` (``Tunable.unsupported``)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    trials, time_config = _measure(tunable, args, configs, problem, timer, sets, limits, copy, jobs)
    _time_again([t for t in trials if t.status == OK], rounds, time_config)
    return trials


def _measure(tunable: Tunable, args: tuple, configs, problem, timer, sets, limits, copy: bool,
             jobs: int) -> Tuple[List[Trial], Callable[[dict], float]]:
    """:func:`measure`'s trials, and the function that timed them (:func:`tune` confirms with it):
    ``time_config(config)`` restores the outputs and returns ``timer``'s ms per call of ``config``."""
    from .problems import problem_of
    why = tunable.unsupported(*args)
    if why is not None:
        raise ValueError(f"{tunable.name} cannot run these arguments: {why}")
    problem = problem or problem_of(tunable.op)
    device = _device(args)
    key = tunable.key(*args)
    timer = timer or default_timer(device)
    limits = device_limits(device) if limits is FROM_DEVICE else limits
    n_sets = sets or auto_sets(args)
    inputs = [clone_args(args) if copy or i else args for i in range(n_sets)]
    tol = REL_TOL[_tensors(args[0])[0].dtype]

    snapshot = {p: [t.clone() for t in _tensors(inputs[0][p])] for p in problem.outputs}
    for ts in snapshot.values():
        for t in ts:
            if t.is_floating_point():
                t.nan_to_num_(0.0)  # garbage in torch.empty outputs must not fail the comparison

    def restore():
        for s in inputs:
            for p, ts in snapshot.items():
                for dst, src in zip(_tensors(s[p]), ts):
                    dst.copy_(src)

    def time_config(cfg: dict) -> float:
        restore()
        return timer(lambda i: tunable.launch(*inputs[i], cfg), n_sets)

    restore()
    problem.reference(*inputs[0])
    expected = {p: [t.clone() for t in _tensors(inputs[0][p])] for p in problem.outputs}

    cands = candidates(tunable, key, configs)
    pruned = [prune_reason(tunable, key, cfg, limits) for cfg in cands]
    tunable.precompile(inputs[0], [cfg for cfg, why in zip(cands, pruned) if why is None], jobs)
    trials = []
    for cfg, why in zip(cands, pruned):
        if why is not None:
            trials.append(Trial(cfg, PRUNED, note=why))
            continue
        restore()
        try:
            tunable.launch(*inputs[0], cfg)
            _sync(device)
        except Exception as e:  # noqa: BLE001 - e.g. out of resources at compile or launch time
            trials.append(Trial(cfg, FAILED, note=f"{type(e).__name__}: {e}"[:300]))
            continue
        err = 0.0
        for p, refs in expected.items():
            for out, ref in zip(_tensors(inputs[0][p]), refs):
                e = rel_err(out, ref) if out.is_floating_point() else (0.0 if torch.equal(out, ref) else math.inf)
                err = max(err, e)
        if err > tol:
            trials.append(Trial(cfg, WRONG, err=err, note=f"relative error {err:.3g} > {tol:g}"))
            continue
        try:
            ms = time_config(cfg)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the timer's graph
            trials.append(Trial(cfg, FAILED, err=err, note=f"timing: {type(e).__name__}: {e}"[:300]))
            continue
        trials.append(Trial(cfg, OK, ms=ms, err=err))
    return trials, time_config


def _faster(ms: float, than_ms: float) -> bool:
    return ms <= than_ms * (1 - MIN_GAIN)


def _time_again(trials: List[Trial], rounds: int, time_config: Callable[[dict], float]) -> None:
    """Time ``trials`` ``rounds`` more times, interleaved (in order on even rounds, reversed on odd ones),
    appending to their ``confirm_ms``."""
    for r in range(rounds):
        for t in trials if r % 2 == 0 else trials[::-1]:
            t.confirm_ms.append(time_config(t.config))


def _confirmed(default: Trial, best: Trial, time_config: Callable[[dict], float]) -> bool:
    """Time ``default`` and ``best`` again, ``CONFIRM_ROUNDS`` interleaved rounds (:func:`_time_again`, the default
    first); whether ``best`` is still ``MIN_GAIN`` faster in the medians."""
    _time_again([default, best], CONFIRM_ROUNDS, time_config)
    return _faster(best.final_ms, default.final_ms)


def tune(tunable: Tunable, args: tuple, *, problem=None, timer: Optional[Timer] = None, sets: Optional[int] = None,
         limits=FROM_DEVICE, copy: bool = False, store: bool = True, jobs: int = JOBS) -> Result:
    """Measure the candidates on ``args`` (``jobs`` compile threads), pick the winner and confirm it against the
    default (module docstring) and, with ``store``, record it in the user cache. Raises RuntimeError when no
    candidate is correct, ValueError (with the reason) when the Tunable cannot run ``args``."""
    t0 = time.perf_counter()
    key = tunable.key(*args)
    trials, time_config = _measure(tunable, args, None, problem, timer, sets, limits, copy, jobs)
    ok = [t for t in trials if t.status == OK]
    if not ok:
        raise RuntimeError(f"no config of {tunable.name} passed at {tunable.table_key(key)}: "
                           + "; ".join(f"{t.config}: {t.status} {t.note}" for t in trials[:3]))
    default = trials[0] if trials[0].status == OK else None
    best = min(ok, key=lambda t: t.ms)
    if default is not None and best is not default and not (
            _faster(best.ms, default.ms) and _confirmed(default, best, time_config)):
        best = default
    if default is None:
        tables.log.warning("autotune: the default config of %s fails at %s: %s", tunable.name,
                           tunable.table_key(key), trials[0].note)
    default_ms = default.final_ms if default else None
    result = Result(tunable, key, best.config, best.final_ms, default_ms, trials, time.perf_counter() - t0)
    if store:
        tables.store(tunable, key, best.config, 1e3 * best.final_ms, None if default_ms is None else 1e3 * default_ms)
    return result
