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


@pytest.fixture
def broken_cuda_backend():
    """A deliberately wrong 'cuda' backend: the harness must catch it."""
    def wrong_salience(q, k, cu, max_seqlen, scale, c, lse, det, out):
        reference.visual_salience(q, k, cu, max_seqlen, scale, c, lse, det, out)
        out.mul_(1.1)

    def wrong_select(scores, vs, ve, keep, indices):
        reference.select_kv(-scores, vs, ve, keep, indices)  # lowest instead of highest

    _backend.register("visual_salience", "cuda", wrong_salience)
    _backend.register("select_kv", "cuda", wrong_select)
    yield
    for op in ("visual_salience", "select_kv"):
        _backend._REGISTRY[op].pop("cuda")
        _backend._RESOLVED.pop((op, "cuda"), None)


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
