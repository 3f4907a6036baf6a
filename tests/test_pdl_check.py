"""bench/pdl_check.py: the scan of inductor's generated Triton kernels for PDL launches without a wait and the
score comparison on the CPU (synthetic sources in inductor's layout); the check itself on a Hopper GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import pdl_check

HEADER = """import triton
import triton.language as tl

from torch._inductor.runtime import triton_helpers, triton_heuristics
triton_helpers.set_driver_to_gpu()

"""


def kernel(name: str, body: str, pdl: bool = True) -> str:
    """One kernel as inductor writes it: heuristics decorator (``triton_meta`` with ``launch_pdl``), ``@triton.jit``,
    the function."""
    return (f"@triton_heuristics.pointwise(\n    size_hints={{'x': 128}}, \n    filename=__file__,\n"
            f"    triton_meta={{'signature': {{'in_ptr0': '*bf16', 'out_ptr0': '*bf16'}}, 'constants': {{}}, "
            f"'enable_fp_fusion': True, 'launch_pdl': {pdl}, 'disable_ftz': False}},\n    min_elem_per_thread=0\n)\n"
            f"@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):\n"
            f"    xnumel = 128\n    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:]\n\n{body}")


WAITS = "    tl.extra.cuda.gdc_wait()\n    tmp0 = tl.load(in_ptr0 + xindex)\n" \
        "    tl.extra.cuda.gdc_launch_dependents()\n    tl.store(out_ptr0 + xindex, tmp0)\n"
TRIGGERS = "    tmp0 = tl.load(in_ptr0 + xindex)\n    tl.extra.cuda.gdc_launch_dependents()\n" \
           "    tl.store(out_ptr0 + xindex, tmp0)\n"
NEITHER = "    tmp0 = tl.load(in_ptr0 + xindex)\n    tl.store(out_ptr0 + xindex, tmp0)\n"


def test_kernels_in_a_kernel_file():
    assert pdl_check.kernels_in(HEADER + kernel("triton_poi_fused_0", WAITS)) == [
        {"name": "triton_poi_fused_0", "body": "def triton_poi_fused_0(in_ptr0, out_ptr0, xnumel, XBLOCK : "
         "tl.constexpr):\n    xnumel = 128\n    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:]\n\n"
         + WAITS.rstrip(), "pdl": True, "wait": True, "launch": True}]


def output_code() -> str:
    """An output code module: each kernel a string of ``async_compile.triton``, then the graph's ``call``."""
    parts = [HEADER, "async_compile = AsyncCompile()\n\n"]
    for name, body, pdl in (("triton_poi_fused_0", WAITS, True), ("triton_poi_fused_1", TRIGGERS, True),
                            ("triton_red_fused_2", NEITHER, True), ("triton_poi_fused_3", NEITHER, False)):
        parts.append(f"\n# kernel path: /tmp/x/{name}.py\n{name} = async_compile.triton('{name}', '''\n{HEADER}"
                     f"{kernel(name, body, pdl)}''', device_str='cuda')\n\n")
    parts.append("async_compile.wait(globals())\n\ndef call(args):\n    triton_poi_fused_0.run(buf0, buf1, 128)\n")
    return "".join(parts)


def test_kernels_in_output_code_take_their_own_decorators_and_body():
    ks = pdl_check.kernels_in(output_code())
    assert [(k["name"], k["pdl"], k["wait"], k["launch"]) for k in ks] == [
        ("triton_poi_fused_0", True, True, True), ("triton_poi_fused_1", True, False, True),
        ("triton_red_fused_2", True, False, False), ("triton_poi_fused_3", False, False, False)]
    assert all(k["body"].endswith("tl.store(out_ptr0 + xindex, tmp0)") for k in ks)  # not the code after it
    assert [pdl_check.no_wait(k) for k in ks] == [False, True, True, False]
    assert pdl_check.no_wait({"pdl": False, "launch": True, "wait": False})  # triggers dependents, never waits


def test_scan_kernels_counts_each_kernel_once(tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "cab.py").write_text(output_code())
    (tmp_path / "cd.py").write_text(HEADER + kernel("triton_poi_fused_1", TRIGGERS))  # also in the output code
    (tmp_path / "ef.py").write_text(HEADER + kernel("triton_poi_fused_1", WAITS))  # same name, another graph
    (tmp_path / "notes.txt").write_text(kernel("triton_txt", NEITHER))
    assert pdl_check.scan_kernels(str(tmp_path)) == {"kernels": 5, "pdl": 4,
                                                      "no_wait": ["triton_poi_fused_1", "triton_red_fused_2"]}
    (tmp_path / "empty").mkdir()
    assert pdl_check.scan_kernels(str(tmp_path / "empty")) == {"kernels": 0, "pdl": 0, "no_wait": []}


def test_score_diff_counts_equal_masked_entries_as_zero():
    a = torch.tensor([[0.5, -float("inf"), 1.0]])
    assert pdl_check.score_diff(a, a.clone()) == 0.0
    assert pdl_check.score_diff(a, torch.tensor([[0.25, -float("inf"), 1.0]])) == 0.25
    assert pdl_check.score_diff(a, torch.tensor([[0.5, 0.0, 1.0]])) == float("inf")


def test_generate_runs_keeps_new_ids_and_scores_on_the_tiny_model():
    pytest.importorskip("transformers")
    from sparsevila_ops.integrations import demo
    from sparsevila_ops.integrations import qwen2_5_vl as sv

    model = demo.build_model(False, torch.device("cpu"), torch.float32)
    inputs = demo.video_inputs(model, 2, 12, 12, 8, "cpu", torch.float32)
    sv.enable(model, 0.75, 0.95, cuda_graph=False)
    try:
        (ids, scores), (ids2, scores2) = pdl_check.generate_runs(model, inputs, 2, 4)
    finally:
        sv.disable(model)
    assert ids.shape == (1, 4) and scores.shape == (4, model.config.text_config.vocab_size)
    assert torch.equal(ids[0], scores.argmax(-1)) and torch.equal(ids, ids2)
    assert pdl_check.score_diff(scores, scores2) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_main_without_a_gpu_skips_with_one_line(capsys):
    assert pdl_check.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.pdl_check: needs a CUDA GPU; skipped"


@pytest.mark.parametrize("args", [["--tokens", "1"], ["--repeats", "0"]])
def test_main_rejects_bad_flags(args, capsys):
    with pytest.raises(SystemExit) as info:
        pdl_check.main(args)
    assert info.value.code == 2 and "must be >= 2" in capsys.readouterr().err


@pytest.mark.gpu
def test_main_checks_pdl_kernels_and_its_exit_status_is_the_verdict(tmp_path):
    """The check in its own process, as ``gpu_check.sh`` runs it: it points inductor at a fresh cache directory
    before anything compiles, which a process that already compiled (earlier tests) cannot guarantee."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("inductor emits PDL on sm90+ only")
    env = {**os.environ, "SPARSEVILA_BENCH_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench.pdl_check", "--tokens", "8", "--repeats", "2"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    report = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "pdl_check.json").exists(), report
    rows = json.loads((tmp_path / "pdl_check.json").read_text())["rows"]
    assert rows[0]["ok"], report  # inductor compiled kernels with PDL: there was something to check
    assert proc.returncode == (0 if all(r["ok"] is not False for r in rows) else 1), report
