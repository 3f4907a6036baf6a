"""bench/common.py: result writers (CPU) and the timing helpers (GPU), including the pytest-benchmark route."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import common


def test_write_results_stamps_meta_and_writes_json_md_png(tmp_path, capsys):
    rows = [{"shape": "a", "ms": 1.23456, "note": None}, {"shape": "b", "ms": 2.0, "note": "x"}]

    def plot(fig):
        fig.add_subplot(1, 1, 1).bar([r["shape"] for r in rows], [r["ms"] for r in rows])

    d = common.write_results("unit", rows, ["shape", "ms", "note"], plot=plot, out_dir=str(tmp_path), title="t")
    data = json.loads((d / "unit.json").read_text())
    assert data["rows"] == rows
    assert {"gpu", "torch", "triton", "commit", "date"} <= set(data["meta"])
    md = (d / "unit.md").read_text()
    assert "| shape | ms | note |" in md and "| a | 1.235 |  |" in md
    assert (d / "unit.png").stat().st_size > 1000
    assert capsys.readouterr().out.strip().endswith("| b | 2 | x |")  # the table is printed last


def test_verify_refuses_a_wrong_output():
    ref = torch.randn(100)
    assert common.verify("ok", ref + 1e-6, ref, 1e-4) < 1e-4
    with pytest.raises(AssertionError, match="refusing to time"):
        common.verify("wrong", ref * 1.1, ref, 1e-3)
    with pytest.raises(AssertionError):
        common.verify("nan", torch.full_like(ref, float("nan")), ref, 1e-3)


@pytest.mark.gpu
def test_time_cuda_eager_and_graph_and_memory():
    x = torch.randn(1 << 20, device="cuda")
    ys = [torch.empty_like(x) for _ in range(2)]
    for graph in (False, True):
        stats = common.time_cuda(lambda i: torch.mul(x, 2, out=ys[i]), n_inputs=2, iters=10, graph=graph)
        assert 0 < stats["p20_ms"] <= stats["median_ms"] <= stats["p80_ms"]
    assert common.peak_extra_memory(lambda: torch.empty(1 << 20, device="cuda")) >= 4 << 20


@pytest.mark.gpu
def test_time_interleaved_times_the_slower_call_slower_in_both_modes():
    x = torch.randn(1 << 22, device="cuda")
    ys = [torch.empty_like(x) for _ in range(2)]
    small = lambda i: torch.mul(x[: 1 << 12], 2, out=ys[i][: 1 << 12])  # noqa: E731
    big = lambda i: [torch.mul(x, 2, out=ys[i]) for _ in range(8)]  # noqa: E731
    for graph in (True, False):
        t = common.time_interleaved(small, big, 2, 2, 10, graph=graph)
        assert 0 < t["a_ms"] < t["b_ms"] and t["diff_ms"] > 0, (graph, t)


def test_benchmark_fixture_tests_are_serial():
    """conftest marks them ``serial``, which gpu_check.sh runs outside pytest-xdist (where the fixture is disabled)."""
    here = os.path.dirname(os.path.abspath(__file__))
    listed = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-m", "serial",
                             os.path.join(here, "test_bench_common.py")], capture_output=True, text=True,
                            cwd=os.path.dirname(here)).stdout
    assert "::test_pedantic_cuda_runs_under_pytest_benchmark" in listed
    assert "::test_benchmark_fixture_tests_are_serial" not in listed


@pytest.mark.gpu
def test_pedantic_cuda_runs_under_pytest_benchmark(benchmark):
    x = torch.randn(1 << 20, device="cuda")
    common.pedantic_cuda(benchmark, lambda: x.mul_(1.0), rounds=5)
    assert benchmark.stats.stats.rounds == 5


def test_decode_floor_read_kernel_reads_every_key(device):
    """The read-floor kernel of bench/decode_floor.py touches every key of [0, n) of every row exactly once:
    its kept-alive product equals sum_j (sum_d k_jd) v_j."""
    from bench.decode_floor import _read_kernel
    g = torch.Generator(device="cpu").manual_seed(0)
    hk, cap, n, D, S = 2, 300, 197, 128, 3
    k = torch.randn(1, hk, cap, D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(1, hk, cap, D, generator=g).to(device, torch.bfloat16)
    out = torch.full((hk * S * 16 * D,), float("nan"), device=device)
    _read_kernel[(S, hk)](k, v, out, n, k.stride(1), v.stride(1), NUM_SPLITS=S, BLOCK_N=32, D=D)
    got = out.view(hk, S, 16, D).sum(1)[:, 0].cpu()
    ks = k[0, :, :n].float().sum(-1, keepdim=True).to(torch.bfloat16).float()  # the kernel's bf16 P
    want = (ks * v[0, :, :n].float()).sum(1).cpu()
    assert torch.allclose(got, want, rtol=0, atol=0.5)  # one key more or less moves a sum by ~10


def test_git_commit_marks_a_tree_that_differs_from_head(monkeypatch):
    import subprocess
    from bench import common
    answers = {"rev-parse": "abc1234", "status": ""}

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[1]] + "\n", stderr="")
    monkeypatch.setattr(common.subprocess, "run", fake_run)
    assert common.git_commit() == "abc1234"
    answers["status"] = " M bench/e2e.py"
    assert common.git_commit() == "abc1234+dirty"


def test_gpu_sampler_reads_while_the_block_runs_and_selects_a_window_of_its_readings():
    import time
    t = iter(range(10 ** 6))
    readings = iter([(1980, 300.0, 0, 700.0), None, (1500, 690.0, 0x4, 700.0), (1600, 650.0, 0x20 | 0x4, 700.0)]
                    + [(1700, 600.0, 0, 700.0)] * 10 ** 5)
    with common.GpuSampler(lambda: next(readings), period_s=0.001, clock=lambda: next(t)) as gpu:
        time.sleep(0.05)
    assert len(gpu.samples) >= 4 and [s[0] for s in gpu.samples[:3]] == [0, 1, 2]  # the None reading is skipped
    whole = gpu.summary()
    assert whole["sm_clock_min_mhz"] == 1500 and whole["power_limit_w"] == 700.0
    assert whole["readings"] == len(gpu.samples)
    head = gpu.summary(since=0, until=2)  # the first three readings
    assert head == {"sm_clock_min_mhz": 1500, "sm_clock_median_mhz": 1600, "power_median_w": 650.0,
                    "power_limit_w": 700.0, "power_capped_share": 2 / 3, "thermal_share": 1 / 3, "readings": 3}
    assert gpu.summary(since=0.5, until=0.9) == {}  # no reading stamped inside
    with common.GpuSampler(lambda: None) as nothing:
        pass
    assert nothing.summary() == {}


def test_gpu_sampler_without_nvml_reads_nothing(monkeypatch):
    monkeypatch.setattr(common, "nvml_reader", lambda device=None: None)
    with common.GpuSampler(period_s=0.001) as gpu:
        pass
    assert gpu.read is None and gpu.summary() == {}

