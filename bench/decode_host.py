"""Where a decode step's host time goes: ``generate``'s Python, per function, over profiled decode steps.

``python -m bench.decode_host [--tokens 16384] [--precision w4a16] [--row c1] [--steps 16] [--step-graph]``.
A row is host-bound when its step's GPU work is shorter than the host's work per step (``bench.e2e``'s D_wait,
the host's unprofiled wait for the GPU, is then ~0): the GPU idles while the host prepares the next step, and D
tracks the host's speed. Here: the e2e model and input
(``bench.e2e``), the row enabled as there (``cuda_graph=True``), one warm-up ``generate`` (compiles and captures),
then one profiled with CUDA activity (the GPU's busy time, span and longest idle gaps per step, named by the
kernels around them: ``gpu_timeline``) and one with Python stacks (``with_stack=True``), each stopped after
``4 + steps`` tokens. Over the decode window (from the stopping criterion's first mark, ``bench.e2e.DECODE_MARK``,
on), per step: every Python function's inclusive and self host ms (self = inclusive minus its Python callees), and the
host's wait for the GPU (``cudaEventSynchronize``: the deferred stop check's wait for the step before; ~0 when
host-bound). Profiling slows Python, so the ms overstate; the split is what this is for.

Writes ``decode_host_<precision>_<row>.{json,md}``: rows ``kind`` (gpu / gpu idle / wait / inclusive / self),
``function``, ``ms_per_step``; the 10 longest idle boundaries and the 25 costliest functions of each kind.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Dict, List

import torch

from bench.common import require_gpu, write_results
from bench.e2e import (DECODE_MARK, GAP_SHORT_US, PRECISIONS, QUESTION_TOKENS, ROWS, _StopAfter, build_model,
                       busy_us, holes, video_for_tokens, video_inputs)

TOP = 25


def python_times(trace: dict, since_mark: str) -> tuple:
    """From a chrome trace (``export_chrome_trace``'s JSON): ``({function: inclusive us}, {function: self us},
    {host op: us}, marks)`` over the events starting at or after the first ``since_mark`` event. Python function
    events nest by time on each thread; a function's self time is its duration minus its direct Python callees'.
    Host ops are the ``cpu_op`` events named ``cudaEventSynchronize`` or ``cudaStreamSynchronize`` (waits), and
    ``marks`` counts ``since_mark`` events (one per generated token)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    marks = [e["ts"] for e in events if e.get("name") == since_mark]
    if not marks:
        return {}, {}, {}, 0
    t0 = min(marks)
    incl: Dict[str, float] = {}
    self_t: Dict[str, float] = {}
    waits: Dict[str, float] = {}
    py = sorted((e for e in events if e.get("cat") == "python_function" and e["ts"] >= t0),
                key=lambda e: (e.get("tid"), e["ts"], -e["dur"]))
    stack: List[list] = []  # [end, name, dur, children_dur, tid]
    def close(item):
        end, name, dur, child, _ = item
        self_t[name] = self_t.get(name, 0.0) + dur - child
    for e in py:
        while stack and (stack[-1][4] != e.get("tid") or stack[-1][0] <= e["ts"]):
            close(stack.pop())
        name = e["name"]
        incl[name] = incl.get(name, 0.0) + e["dur"]
        if stack:
            stack[-1][3] += e["dur"]
        stack.append([e["ts"] + e["dur"], name, e["dur"], 0.0, e.get("tid")])
    while stack:
        close(stack.pop())
    for e in events:
        if e["ts"] >= t0 and e.get("name") in ("cudaEventSynchronize", "cudaStreamSynchronize"):
            waits[e["name"]] = waits.get(e["name"], 0.0) + e["dur"]
    return incl, self_t, waits, len(marks)


def gpu_timeline(events, since_mark: str, short_us: float = GAP_SHORT_US) -> tuple:
    """The GPU's side of the decode window (``torch.profiler`` events from the first ``since_mark`` on): ``(busy
    us, span us, {(kernel before, kernel after): [idle us, count]} of the idle gaps longer than ``short_us``,
    marks)``. Names the boundaries where the GPU waits: a step's first kernel after the last one of the step before
    is the graph launch's latency and the host's lag."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    marks = [e.time_range.start for e in events if e.name == since_mark and e.device_type == cpu]
    if not marks:
        return 0.0, 0.0, {}, 0
    t0 = min(marks)
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in events  # kernels and copies, not the
                if e.device_type == cuda and not getattr(e, "is_user_annotation", False)  # GPU side of a range
                and e.time_range.start >= t0)
    gaps: Dict[tuple, list] = {}
    for gap, before, after in holes(ks):
        if gap > short_us:
            g = gaps.setdefault((before[2][:70], after[2][:70]), [0.0, 0])
            g[0] += gap
            g[1] += 1
    span = max(b for _, b, _ in ks) - ks[0][0] if ks else 0.0
    return busy_us([(a, b) for a, b, _ in ks]), span, gaps, len(marks)


def table(incl: Dict[str, float], self_t: Dict[str, float], waits: Dict[str, float], steps: int,
          gpu: tuple = (0.0, 0.0, {}, 0), gpu_steps: int = 1) -> List[dict]:
    """The GPU's busy / span / idle gaps (``gpu_timeline``, over ``gpu_steps``), then the 25 costliest functions by
    inclusive and by self time and the waits, in ms per step."""
    busy, span, gaps, _ = gpu
    rows = [{"kind": "gpu", "function": n, "ms_per_step": round(us / gpu_steps / 1e3, 4)}
            for n, us in (("busy (union of kernels)", busy), ("span (first kernel to last)", span),
                          ("idle", span - busy)) if span]
    rows += [{"kind": "gpu idle", "function": f"{a} -> {b} (x{c / gpu_steps:.2f})",
              "ms_per_step": round(us / gpu_steps / 1e3, 4)}
             for (a, b), (us, c) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:10]]
    for kind, d in (("wait", waits), ("inclusive", incl), ("self", self_t)):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:TOP]
        rows += [{"kind": kind, "function": n[:140], "ms_per_step": round(us / steps / 1e3, 4)} for n, us in top]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="visual tokens of the input (default 16384)")
    p.add_argument("--precision", choices=PRECISIONS, default="w4a16")
    p.add_argument("--row", choices=[k for k in ROWS if k != "a"], default="c1")
    p.add_argument("--steps", type=int, default=16, help="profiled decode steps (default 16)")
    p.add_argument("--step-graph", action="store_true", help="enable(..., step_graph=True): the integration's own "
                   "graphs of the decode step instead of inductor's CUDA-graph trees")
    a = p.parse_args(argv)
    if a.tokens < 1 or a.steps < 1:
        p.error(f"--tokens and --steps must be positive; got {a.tokens}, {a.steps}")
    if not require_gpu("bench.decode_host"):
        return 0
    from torch.profiler import ProfilerActivity, profile
    from transformers import StoppingCriteriaList

    from sparsevila_ops.integrations import qwen2_5_vl as sv
    from sparsevila_ops.quant import quantize_model_linears

    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = build_model(True, dev, dtype)
    if a.precision == "w4a16":
        quantize_model_linears(model.model.language_model, group_size=128)
        torch.cuda.empty_cache()
    video = video_for_tokens(a.tokens)
    inputs = video_inputs(model, video["frames"], video["h"], video["w"], QUESTION_TOKENS, dev, dtype)
    n = 4 + a.steps
    gen = dict(max_new_tokens=n + 4, eos_token_id=None, do_sample=False)
    sv.enable(model, *ROWS[a.row][1], cuda_graph=True, step_graph=a.step_graph)
    try:
        with torch.no_grad():
            for _ in range(2):  # compile + capture, then a replay-only run
                model.generate(**inputs, **gen, stopping_criteria=StoppingCriteriaList([_StopAfter(n)]))
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as gpu_prof:
                model.generate(**inputs, **gen, stopping_criteria=StoppingCriteriaList([_StopAfter(n)]))
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                model.generate(**inputs, **gen, stopping_criteria=StoppingCriteriaList([_StopAfter(n)]))
                torch.cuda.synchronize()
    finally:
        sv.disable(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    incl, self_t, waits, marks = python_times(trace, DECODE_MARK)
    steps = max(marks - 1, 1)  # the window opens at the first token's mark: marks - 1 decode steps follow
    gpu = gpu_timeline(gpu_prof.events(), DECODE_MARK)
    write_results(f"decode_host_{a.precision}_{a.row}" + ("_step_graph" if a.step_graph else ""),
                  table(incl, self_t, waits, steps, gpu, max(gpu[3] - 1, 1)),
                  ["kind", "function", "ms_per_step"],
                  title=f"Host ms per decode step of generate, {a.precision} row {a.row}, {video['visual_tokens']} "
                        f"visual tokens, {steps} profiled steps (Python profiling overhead included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
