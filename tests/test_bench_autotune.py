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
