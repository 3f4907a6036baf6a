"""bench.figure3_salience's command line on the CPU: the shapes it accepts and the one-line skip without a GPU."""
import pytest
import torch

from bench import figure3_salience as f


def test_bound_shapes_hold_about_64k_tokens_around_1024():
    lengths = sorted(s.N for s in f.BOUND_SHAPES)
    assert lengths[0] < 1024 < lengths[-1]  # either side of the 1024-token frames
    assert all(60_000 <= s.B * s.N <= 66_000 for s in f.BOUND_SHAPES)
    assert not {s.name for s in f.BOUND_SHAPES} & {s.name for s in f.SHAPES}


def test_tile_bound_shapes_hold_about_64k_tokens_between_1024_and_2048():
    lengths = sorted(s.N for s in f.TILE_BOUND_SHAPES)
    assert 1024 < lengths[0] and lengths[-1] < 2048
    assert all(60_000 <= s.B * s.N <= 66_000 for s in f.TILE_BOUND_SHAPES)
    assert not {s.name for s in f.TILE_BOUND_SHAPES} & {s.name for s in f.SHAPES + f.BOUND_SHAPES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_a_bound_shape_is_accepted_by_name_and_skips_without_a_gpu(capsys):
    assert f.main(["--shape", f.BOUND_SHAPES[1].name]) == 0
    assert capsys.readouterr().out.strip() == "bench.figure3_salience: needs a CUDA GPU; skipped"
    with pytest.raises(SystemExit):
        f.main(["--shape", "no such shape"])


def test_sustained_rows_give_the_exp_floor_at_the_sampled_clock(monkeypatch):
    class Sampler:  # the readings of a 1000 MHz clock
        def __init__(self, period_s):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def summary(self):
            return {"sm_clock_median_mhz": 1000.0, "power_median_w": 650.0, "power_capped_share": 0.5}
    calls = []
    monkeypatch.setattr(f, "GpuSampler", Sampler)
    monkeypatch.setattr(f, "time_cuda", lambda fn, **kw: calls.append(kw["iters"]) or {"median_ms": 2.0})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"multi_processor_count": 132}))
    exps = f.EXP_PER_CLK_SM * 132 * 1e9 * 1e-3  # one millisecond of exps at 1000 MHz
    row = f.sustained(lambda i: None, 0.25, exps)
    assert calls == [int(f.SUSTAINED_S * 1e3 / 0.25)]  # ~0.5 s of calls
    assert row == {"sustained_ms": 2.0, "sm_mhz": 1000.0, "power_w": 650.0, "capped": 0.5,
                   "exp_floor_at_clock_ms": pytest.approx(1.0), "x_floor_at_clock": pytest.approx(2.0)}
    Sampler.summary = lambda self: {}  # no NVML: only the time
    assert f.sustained(lambda i: None, 100.0, exps) == {"sustained_ms": 2.0}
