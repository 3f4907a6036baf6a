"""bench.autotune --combine on the CPU: a later run replaces an op's rows; geomeans over all and unswept shapes."""
import json
import math

from bench import autotune as ba


def _run(path, rows):
    path.write_text(json.dumps({"meta": {}, "rows": [
        {"op": op, "shape": str(i), "swept": swept, "speedup": x} for i, (op, swept, x) in enumerate(rows)]}))
    return str(path)


def test_combine_takes_each_op_from_the_last_run_and_summarizes(tmp_path):
    first = _run(tmp_path / "a.json", [("gemv/cuda", False, 2.0), ("gemv/cuda", True, 8.0),
                                       ("pack_kv/triton", False, 0.5)])
    second = _run(tmp_path / "b.json", [("pack_kv/triton", False, 1.0), ("pack_kv/triton", False, 4.0)])
    per_op, overall = ba.combine([first, second])
    assert [(s["op"], s["shapes"], s["unswept"]) for s in per_op] == [("gemv/cuda", 2, 1), ("pack_kv/triton", 2, 2)]
    assert math.isclose(per_op[0]["geomean"], 4.0) and math.isclose(per_op[0]["geomean_unswept"], 2.0)
    assert math.isclose(per_op[1]["geomean"], 2.0) and per_op[1]["worst"] == 1.0  # b.json replaced pack's 0.5
    assert (overall["op"], overall["shapes"], overall["unswept"]) == ("all", 4, 3)
    assert math.isclose(overall["geomean"], (2.0 * 8.0 * 1.0 * 4.0) ** 0.25)
    assert math.isclose(overall["geomean_unswept"], 8.0 ** (1 / 3)) and overall["worst"] == 1.0


def test_combine_writes_beside_the_last_run_without_a_gpu(tmp_path):
    run = _run(tmp_path / "autotune.json", [("gemv/cuda", False, 1.5)])
    assert ba.main(["--combine", run]) == 0
    rows = json.loads((tmp_path / "autotune_combined.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["gemv/cuda", "all"] and math.isclose(rows[-1]["geomean_unswept"], 1.5)


def test_run_records_trials_and_times_an_earlier_default(tmp_path, monkeypatch, request):
    """``run`` under the interpreter with a scripted timer: each row keeps every trial (the default first), and
    with ``against`` the earlier run's default is timed in the same rounds (``earlier_us``, ``default_gain``)."""
    import itertools

    from sparsevila_ops import autotune
    from sparsevila_ops.autotune import tuner
    monkeypatch.setenv("SPARSEVILA_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    autotune.reset()
    request.addfinalizer(autotune.reset)  # no memo of this test's cache outlives it
    earlier_cfg = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    ticks = itertools.count()

    def timer(run, n):  # the earlier default 2x slower than anything else, the rest in a fixed rotation
        run(0)
        return 0.02 if cfg_now[0] == earlier_cfg else 0.01 + next(ticks) % 3 * 1e-4
    cfg_now = [None]
    launch = autotune.kernel("gemv").launch
    monkeypatch.setattr(autotune.kernel("gemv"), "launch",
                        lambda *a: (cfg_now.__setitem__(0, a[-1]), launch(*a))[1])
    monkeypatch.setattr(tuner, "default_timer", lambda device: timer)
    make_args = autotune.make_args
    monkeypatch.setattr(autotune, "make_args", lambda op, shape, device: make_args(op, shape, "cpu"))
    monkeypatch.setattr(ba, "GRID", {"gemv": [{"M": 1, "N": 24, "K": 64, "glu": False, "bias": False}]})
    monkeypatch.setattr(autotune, "KERNELS", {k: v for k, v in autotune.KERNELS.items() if k == ("gemv", "triton")})
    rows, _ = ba.run(["gemv"], False)
    assert rows[0]["trials"][0]["config"] == autotune.kernel("gemv").default(autotune.kernel("gemv").key(
        *make_args("gemv", {"M": 1, "N": 24, "K": 64, "glu": False, "bias": False}, "cpu")))
    assert all(t["status"] == "ok" and t["us"] > 0 for t in rows[0]["trials"])
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"meta": {}, "rows": [dict(rows[0], trials=[{"config": earlier_cfg}])]}))
    against = ba.earlier_defaults([str(path)])
    assert against == {("gemv/triton", "M=1,N=24,K=64,glu=False,bias=False"): earlier_cfg}
    rows, summary = ba.run(["gemv"], False, against=against)
    assert math.isclose(rows[0]["earlier_us"], 20.0) and 1.9 < rows[0]["default_gain"] < 2.1
    assert summary[0]["default_gain"] == rows[0]["default_gain"] == summary[0]["default_gain_worst"]
