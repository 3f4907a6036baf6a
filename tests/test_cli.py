"""The command line: the fuzz harness (passes on a correct backend, fails with a repro on a wrong one) and the
pipeline demo (the README's main job) on the CPU."""
import json

import pytest
import torch

from sparsevila_ops import _backend, fuzz, reference
from sparsevila_ops.__main__ import main as cli


@pytest.mark.parametrize("op", sorted(fuzz.GENERATORS))
def test_fuzz_reference_against_itself_passes(op, capsys):
    assert fuzz.main(["--op", op, "--backend", "reference", "--cases", "6", "--seed", "3", "--device", "cpu"]) == 0
    assert "6 passed, 0 failed" in capsys.readouterr().out


def test_fuzz_runs_an_extra_op_on_a_real_backend(capsys):
    """``w4a16_linear`` lives in the ``[quant]`` extra's namespace (torch.ops.sparsevila_quant): the harness imports
    it, and its Triton kernel (interpreted here) passes against the reference."""
    assert fuzz.main(["--op", "w4a16_linear", "--backend", "triton", "--cases", "4", "--seed", "0",
                      "--device", "cpu"]) == 0
    assert "4 passed, 0 failed (triton vs reference" in capsys.readouterr().out


@pytest.fixture
def broken_cuda_backend():
    """A deliberately wrong 'cuda' backend: the harness must catch it."""
    def wrong_salience(q, k, cu, max_seqlen, scale, c, lse, det, out):
        reference.visual_salience(q, k, cu, max_seqlen, scale, c, lse, det, out)
        out.mul_(1.1)

    def wrong_select(scores, vs, ve, keep, indices):
        reference.select_kv(-scores, vs, ve, keep, indices)  # lowest instead of highest

    before = {op: _backend._REGISTRY[op].get("cuda") for op in ("visual_salience", "select_kv")}
    _backend.register("visual_salience", "cuda", wrong_salience)
    _backend.register("select_kv", "cuda", wrong_select)
    yield
    for op, target in before.items():  # put back what was registered (visual_salience has a real cuda backend)
        if target is None:
            _backend._REGISTRY[op].pop("cuda")
            for key in [k for k in _backend._RESOLVED if k[:2] == (op, "cuda")]:
                del _backend._RESOLVED[key]
        else:
            _backend.register(op, "cuda", target)


@pytest.mark.parametrize("op", ["visual_salience", "select_kv"])
def test_fuzz_catches_a_wrong_backend_and_prints_repro(op, broken_cuda_backend, capsys):
    rc = fuzz.main(["--op", op, "--backend", "cuda", "--cases", "8", "--seed", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and f"repro: python -m sparsevila_ops fuzz --op {op} --backend cuda --cases 1 --seed" in out


def test_fuzz_cases_are_seeded():
    import random
    a = fuzz.GENERATORS["prefill_attention_relevance"](random.Random(5), torch.Generator().manual_seed(5),
                                                       torch.device("cpu"), False)
    b = fuzz.GENERATORS["prefill_attention_relevance"](random.Random(5), torch.Generator().manual_seed(5),
                                                       torch.device("cpu"), False)
    assert a.desc == b.desc and torch.equal(a.args[0], b.args[0])


def test_demo_runs_the_whole_pipeline_on_cpu(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert cli(["demo", "--device", "cpu", "--size", "small", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["backend"] == "reference"
    assert res["kept_visual_tokens"] == res["merged_visual_tokens"] // 4
    assert res["packed_length"] == 32 + res["decode_keep_per_head"] + 24
    # Planted structure must be found by salience and relevance, and the packed cache must carry most of the
    # full-attention mass: these fail if selection or packing picks the wrong tokens.
    assert res["planted_salient_groups_kept"] >= 0.9
    assert res["question_relevant_keys_selected"] >= 0.9
    assert 0.5 < res["attention_mass_recall_mean"] <= 1.0
    assert res["max_abs_diff_packed_vs_full"] > 0  # sparse decode is an approximation, not the same call
    assert "where the time went" in capsys.readouterr().out


def test_cli_usage():
    assert cli([]) == 2


@pytest.mark.parametrize("args,named", [
    (["--cases", "-3"], "--cases"),
    (["--cases", "0"], "--cases"),
    (["--device", "nodevice"], "--device"),
    (["--device", "meta"], "--device"),
    pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                            reason="CUDA is available")),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),
    (["--backend", "cuda", "--device", "cpu"], "cuda"),
], ids=["cases-negative", "cases-zero", "device-unknown", "device-meta", "device-cuda-absent", "device-index",
        "backend-cannot-run"])
def test_fuzz_refuses_bad_arguments_up_front(args, named, capsys):
    """One error line naming the argument and a non-zero exit, before any case runs (no per-case tracebacks)."""
    with pytest.raises(SystemExit) as info:
        fuzz.main(["--op", "decode_attention", "--cases", "2", *args])
    assert info.value.code != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0] and "Traceback" not in captured.err


@pytest.mark.parametrize("op", ["visual_salience", "prefill_attention", "prefill_attention_relevance", "kv_relevance",
                                "pack_kv", "decode_attention", "append_kv", "rope_append_kv",
                                "sparse_decode_attention"])
def test_fuzz_draws_strided_index_tensors_and_keeps_their_layout(op):
    """Some seeds give an op's int32 index tensors a non-unit last-dim stride (a column of a wider table), and
    the copies each backend runs on keep every argument's strides."""
    import random
    strided = 0
    for seed in range(16):
        case = fuzz.GENERATORS[op](random.Random(seed), torch.Generator().manual_seed(seed), torch.device("cpu"),
                                   False)
        strided += any(isinstance(a, torch.Tensor) and a.dtype == torch.int32 and a.shape[-1] > 1
                       and a.stride(-1) > 1 for a in case.args)
        for a, c in zip(case.args, fuzz._clone_args(case.args)):
            for t, u in zip(a if isinstance(a, list) else [a], c if isinstance(c, list) else [c]):
                if isinstance(t, torch.Tensor):
                    assert u.stride() == t.stride()
                    torch.testing.assert_close(u, t, rtol=0, atol=0, equal_nan=True)  # outputs are torch.empty
    assert strided > 0


def test_cli_help_lists_every_command_and_exits_0(capsys):
    from sparsevila_ops.__main__ import COMMANDS
    for flag in ("--help", "-h"):
        assert cli([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m sparsevila_ops <command>")
        for name, (_, description) in COMMANDS.items():
            assert f"  {name}  " in out and description in out


def test_cli_unknown_command_names_it_and_exits_2(capsys):
    assert cli(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and "demo" in err


@pytest.mark.parametrize("args,message", [
    (["--prefill-sparsity", "1.5"], "--prefill-sparsity must be in [0, 1); got 1.5"),
    (["--prefill-sparsity", "-0.25"], "--prefill-sparsity must be in [0, 1); got -0.25"),
    (["--decode-sparsity", "1.0"], "--decode-sparsity must be in [0, 1); got 1.0"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N; got 'tpu'"),
    pytest.param(["--device", "cuda"], "--device cuda needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    (["--json", "/nonexistent-dir/demo.json"], "--json /nonexistent-dir/demo.json"),
], ids=["prefill-above-1", "prefill-negative", "decode-1", "device-unknown", "device-cuda-absent", "json-dir"])
def test_demo_refuses_bad_flags_with_one_line(args, message, capsys):
    """Flags are validated before anything runs: one line naming the flag, a non-zero exit, no traceback."""
    assert cli(["demo", *args]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


def test_demo_times_decode_per_token_and_says_how(tmp_path, capsys):
    """Decode is timed as one token's decode_attention over every layer (a CUDA-graph replay on the GPU), packed
    and full cache side by side, and the printout says what the number measures."""
    path = tmp_path / "demo.json"
    assert cli(["demo", "--device", "cpu", "--size", "small", "--json", str(path)]) == 0
    times = json.loads(path.read_text())["times_ms"]
    assert {"5 decode, packed cache (per token, 4 layers)", "5' decode, full cache (per token, 4 layers)"} <= set(times)
    assert not any("append + attention" in k for k in times)  # the old per-call wall clock with a sync per call
    assert "decode: wall clock of the eager torch reference" in capsys.readouterr().out


def test_time_decode_step_runs_the_step_eagerly_on_cpu():
    from sparsevila_ops.demo import time_decode_step
    calls = []
    assert time_decode_step(lambda: calls.append(1), torch.device("cpu")) >= 0.0
    assert len(calls) == 4  # one warm-up + three timed calls


@pytest.mark.gpu
def test_time_decode_step_replays_a_cuda_graph():
    from sparsevila_ops.demo import time_decode_step
    x, calls = torch.zeros(1024, device="cuda"), []

    def step():
        calls.append(1)
        x.add_(1.0)
    assert time_decode_step(step, torch.device("cuda"), replays=20) > 0.0
    assert len(calls) == 2  # warm-up + capture: the 21 timed runs are graph replays, with no Python in them
    assert x[0].item() == 1 + 3 + 20  # warm-up, (capture runs nothing), 3 warm replays, 20 timed replays


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
@pytest.mark.parametrize("module,args", [
    ("bench.select", ["--quick"]), ("bench.decode", ["--quick"]), ("bench.decode_floor", []),
    ("bench.decode_timeline", []), ("bench.figure3", ["--quick"]), ("bench.ncu_targets", []),
    ("bench.autotune", ["--quick"]), ("bench.integration_memory_check", []),
])
def test_benchmarks_without_a_gpu_skip_with_one_line(module, args, capsys):
    import importlib
    assert importlib.import_module(module).main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out and all(line.endswith(": needs a CUDA GPU; skipped") for line in out), out


def test_ncu_targets_help_exits_0_with_its_usage(capsys):
    from bench import ncu_targets
    with pytest.raises(SystemExit) as info:
        ncu_targets.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench.ncu_targets") and "ncu --profile-from-start off" in out


def test_available_backends_reports_what_can_run_here(monkeypatch):
    import sparsevila_ops as so
    assert "device" in so.available_backends.__doc__
    for op in _backend._REGISTRY:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert so.available_backends(op, "cpu") == ["reference"]  # triton and cuda need a GPU
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert so.available_backends(op, torch.device("cpu")) == ["reference", "triton"]  # the interpreter
        for backend in so.available_backends(op, "cpu"):  # what it reports, dispatch accepts
            with so.use_backend(backend):
                assert callable(_backend.resolve(op, torch.device("cpu")))
        if not torch.cuda.is_available():
            assert so.available_backends(op) == so.available_backends(op, "cpu")
            assert so.available_backends(op, "cuda") == []
    with pytest.raises(ValueError, match="op must be one of"):
        so.available_backends("no_such_op")
