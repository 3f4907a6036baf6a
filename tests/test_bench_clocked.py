"""bench.clocked on the CPU: the command runs, its status comes back, one summary line follows its output."""
import json
import sys

import pytest

from bench import clocked


class Sampler:  # two readings at 1500 MHz
    def __init__(self, period_s):
        self.period_s = period_s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def summary(self):
        return {"sm_clock_median_mhz": 1500.0, "readings": 2}


def test_runs_the_command_and_prints_the_summary_after_it(monkeypatch, capfd):
    monkeypatch.setattr(clocked, "GpuSampler", Sampler)
    assert clocked.main(["--", sys.executable, "-c", "print('probe line'); raise SystemExit(3)"]) == 3
    out = capfd.readouterr().out.splitlines()
    assert out[0] == "probe line" and out[1].startswith("clocks: ")
    assert json.loads(out[1][len("clocks: "):]) == {"sm_clock_median_mhz": 1500.0, "readings": 2}


def test_no_readings_and_no_command(monkeypatch, capfd):
    monkeypatch.setattr(Sampler, "summary", lambda self: {})
    monkeypatch.setattr(clocked, "GpuSampler", Sampler)
    assert clocked.main([sys.executable, "-c", "pass"]) == 0
    assert capfd.readouterr().out.strip() == 'clocks: {"readings": 0}'
    with pytest.raises(SystemExit):
        clocked.main(["--"])
