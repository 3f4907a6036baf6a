"""bench.decode_host's trace accounting, on a real CPU profile and a synthetic trace."""
import json
import os

import pytest
import torch

from bench import decode_host
from bench.e2e import DECODE_MARK


def _inner(x):
    return (x @ x).sum()


def _outer(x):
    return [_inner(x) for _ in range(3)]


def test_python_times_from_a_real_profile(tmp_path):
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _outer(x)  # before the window: not counted
        for _ in range(2):
            with torch.profiler.record_function(DECODE_MARK):
                pass
            _outer(x)
    path = os.path.join(tmp_path, "t.json")
    prof.export_chrome_trace(path)
    incl, self_t, _, marks = decode_host.python_times(json.load(open(path)), DECODE_MARK)
    assert marks == 2
    outer = [n for n in incl if n.endswith("_outer")]
    inner = [n for n in incl if n.endswith("_inner")]
    assert len(outer) == 1 and len(inner) == 1
    assert incl[outer[0]] >= incl[inner[0]] > 0 and self_t[outer[0]] <= incl[outer[0]] - incl[inner[0]] + 1e-6


def test_python_times_nesting_self_time_and_waits():
    def ev(name, ts, dur, cat="python_function", tid=1):
        return dict(ph="X", name=name, ts=ts, dur=dur, cat=cat, tid=tid)
    trace = {"traceEvents": [
        ev("early", 0, 50), ev(DECODE_MARK, 100, 1, "user_annotation"),
        ev("loop", 100, 100), ev("step", 110, 60), ev("leaf", 120, 20), ev("leaf", 150, 10), ev("tail", 180, 10),
        ev("other_thread", 105, 30, tid=2), ev("cudaEventSynchronize", 160, 5, "cuda_runtime"),
        ev(DECODE_MARK, 199, 1, "user_annotation")]}
    incl, self_t, waits, marks = decode_host.python_times(trace, DECODE_MARK)
    assert marks == 2 and "early" not in incl
    assert incl == {"loop": 100, "step": 60, "leaf": 30, "tail": 10, "other_thread": 30}
    assert self_t == {"loop": 30, "step": 30, "leaf": 30, "tail": 10, "other_thread": 30}
    assert waits == {"cudaEventSynchronize": 5}
    rows = decode_host.table(incl, self_t, waits, 2)
    assert rows[0] == {"kind": "wait", "function": "cudaEventSynchronize", "ms_per_step": 0.0025}
    assert [r["function"] for r in rows if r["kind"] == "inclusive"][:2] == ["loop", "step"]
    assert decode_host.python_times({"traceEvents": []}, DECODE_MARK) == ({}, {}, {}, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_main_without_a_gpu_skips_with_one_line(capsys):
    assert decode_host.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.decode_host: needs a CUDA GPU; skipped"


def test_gpu_timeline_names_the_idle_boundaries():
    from types import SimpleNamespace as NS
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ev = lambda name, dev, a, b, ann=False: NS(name=name, device_type=dev, time_range=NS(start=a, end=b),  # noqa: E731
                                               is_user_annotation=ann)
    events = [ev("prefill", cuda, 0, 90), ev(DECODE_MARK, cpu, 100, 101), ev(DECODE_MARK, cuda, 102, 300, True),
              ev("gemv", cuda, 110, 150), ev("norm", cuda, 145, 160), ev("argmax", cuda, 165, 170),
              ev(DECODE_MARK, cpu, 171, 172), ev("gemv", cuda, 300, 340), ev("argmax", cuda, 345, 350),
              ev(DECODE_MARK, cpu, 351, 352)]
    busy, span, gaps, marks = decode_host.gpu_timeline(events, DECODE_MARK, short_us=10.0)
    assert (busy, span, marks) == (50 + 5 + 40 + 5, 240, 3)
    assert gaps == {("argmax", "gemv"): [130, 1]}  # the 5 us gaps are launch latency
    rows = decode_host.table({}, {}, {}, 2, (busy, span, gaps, marks), 2)
    assert rows == [{"kind": "gpu", "function": "busy (union of kernels)", "ms_per_step": 0.05},
                    {"kind": "gpu", "function": "span (first kernel to last)", "ms_per_step": 0.12},
                    {"kind": "gpu", "function": "idle", "ms_per_step": 0.07},
                    {"kind": "gpu idle", "function": "argmax -> gemv (x0.50)", "ms_per_step": 0.065}]
    assert decode_host.gpu_timeline([], DECODE_MARK) == (0.0, 0.0, {}, 0)
