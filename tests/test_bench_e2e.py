"""bench/e2e.py (Table 2) on the CPU: the pure parts (video size for a token count, KV entries and bytes a
decode step reads, its floor, the table and its speedups) and a smoke run of the harness's core loop on the
tiny Qwen2.5-VL config with every row, bf16 and 4-bit."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from bench import e2e

transformers = pytest.importorskip("transformers")


def test_video_for_tokens_gives_the_stated_inputs():
    assert [e2e.video_for_tokens(t) for t in e2e.TARGETS] == [
        {"frames": f, "h": 32, "w": 32, "px": 448, "visual_tokens": t} for f, t in ((128, 16384), (512, 65536),
                                                                                 (1024, 131072))]
    v = e2e.video_for_tokens(16000)  # about: the nearest whole number of 2-frame groups
    assert v["frames"] == 124 and v["visual_tokens"] == 62 * 256
    assert e2e.video_for_tokens(1, side=12) == {"frames": 2, "h": 12, "w": 12, "px": 168, "visual_tokens": 36}
    for side in (31, 0, 2.0):
        with pytest.raises(ValueError, match="side must be an even number of patches"):
            e2e.video_for_tokens(100, side=side)


def test_kept_visual_and_kv_entries_read_per_step():
    assert e2e.kept_visual(16384, 0.75) == 4096 and e2e.kept_visual(4096, 0.95) == 205  # round(204.8)
    assert e2e.kept_visual(16384, 0.0) == 16384 and e2e.kept_visual(3, 0.9) == 1 and e2e.kept_visual(0, 0.5) == 0
    prompt = 16384 + 78
    assert e2e.decode_kv_tokens(prompt, 16384, 0.75, 0.95, 256) == 78 + 205 + 128
    assert e2e.decode_kv_tokens(prompt, 16384, 0.0, 0.0, 256) == prompt + 128
    assert e2e.decode_kv_tokens(prompt, 16384, 0.9, 0.0, 2) == 78 + 1638 + 1


def test_kv_bytes_and_decode_floor_of_the_7b_config():
    from transformers import Qwen2_5_VLConfig
    from sparsevila_ops.integrations.demo import QWEN25_VL_7B
    kv_tok = e2e.kv_bytes_per_token(Qwen2_5_VLConfig(**QWEN25_VL_7B).text_config)
    assert kv_tok == 28 * 2 * 4 * 128 * 2
    # 15.2 GB of bf16 weights + 128k tokens of KV (7.5 GB) at 4 TB/s
    assert e2e.decode_floor_ms(15.2e9, 131072, kv_tok, 4.0) == pytest.approx((15.2e9 + 131072 * 57344) / 4e9)


def _raw(row, precision, E, P, D, tokens=16384):
    return {"input": "16k", "visual_tokens": tokens, "precision": precision, "row": row, "E_ms": E, "P_ms": P,
            "D_ms": D, "weight_bytes": 1e9, "kv_tokens": 1000.0}


def test_assemble_e2e_floor_and_speedups_over_row_b_of_the_same_input_and_precision():
    raw = [_raw("a", "bf16", 300.0, 100.0, 30.0), _raw("b", "bf16", 100.0, 100.0, 20.0),
           _raw("c1", "bf16", 110.0, 25.0, 10.0), _raw("b", "w4a16", 100.0, 120.0, 8.0),
           _raw("c1", "w4a16", 100.0, 30.0, 4.0), _raw("c1", "bf16", 1.0, 1.0, 1.0, tokens=65536)]
    t = e2e.assemble(raw, 2.0, 100, answer_tokens=1500)
    assert t[0]["E2E_s"] == pytest.approx((300 + 100 + 1500 * 30) / 1e3)
    assert t[1]["E_speedup"] == t[1]["E2E_speedup"] == 1.0
    assert t[2]["D_speedup"] == pytest.approx(2.0) and t[2]["P_speedup"] == pytest.approx(4.0)
    assert t[2]["E2E_speedup"] == pytest.approx((200 + 30000) / (135 + 15000))
    assert t[4]["D_speedup"] == pytest.approx(2.0)  # against the 4-bit row (b), not the bf16 one
    assert t[5]["E2E_speedup"] is None  # no row (b) at 64k
    floor = (1e9 + 1000 * 100) / 2e12 * 1e3
    assert t[0]["D_floor_ms"] == pytest.approx(floor) and t[0]["D_over_floor"] == pytest.approx(30.0 / floor)
    assert "D_floor_ms" not in e2e.assemble(raw, None, 100)[0]
    assert raw[0].keys() == _raw("a", "bf16", 0, 0, 0).keys()  # the input rows are not modified


@pytest.fixture
def tiny_model(monkeypatch):
    """demo.TINY with the LLM twice as wide (hidden 128, MLP 256, 8 heads of 16) so that its linear layers
    quantize with group 128."""
    from sparsevila_ops.integrations import demo
    tiny = copy.deepcopy(demo.TINY)
    tiny["text_config"].update(hidden_size=128, intermediate_size=256, num_attention_heads=8)
    tiny["vision_config"]["out_hidden_size"] = 128
    monkeypatch.setattr(demo, "TINY", tiny)
    return demo.build_model(False, torch.device("cpu"), torch.bfloat16)


def test_decode_ignores_eos_without_a_per_step_logits_processor(tiny_model, monkeypatch):
    """D's tokens ignore EOS (``eos_token_id=None``): the row generates every step even when the model's EOS is its
    greedy token, and no ``min_new_tokens`` processor (four eager ops per step) or EOS check runs."""
    from transformers.generation import logits_process, stopping_criteria
    from sparsevila_ops.integrations import demo

    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(tiny_model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    with torch.no_grad():
        first = tiny_model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
    monkeypatch.setattr(tiny_model.generation_config, "eos_token_id", first)  # EOS would stop at once

    def forbidden(*a, **k):
        raise AssertionError("a per-step EOS processor or check ran")
    monkeypatch.setattr(logits_process.MinNewTokensLengthLogitsProcessor, "__call__", forbidden)
    monkeypatch.setattr(stopping_criteria.EosTokenCriteria, "__call__", forbidden)
    rows = e2e.run_rows(tiny_model, inputs, ["a", "c1"], decode_steps=4, precision="bf16", video=video)
    assert [r["generated"] for r in rows] == [4, 4]
    assert all(r["D_wait_ms"] >= 0 for r in rows)  # 4 stop checks: 2 decode steps timed


def test_stop_check_times_every_token_and_restores_the_check(tiny_model):
    """``stop_check_times`` gets one time per generated token from transformers' stop check (the host's wait for
    the GPU), puts the check back afterwards, and ``decode_wait_ms`` leaves out the two calls that wait for the
    prefill."""
    from transformers.generation import utils as gen_utils

    before = gen_utils.StopCheck.__dict__["__call__"], gen_utils.DeferredStopCheck.__dict__["__call__"]
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad(), e2e.stop_check_times() as times:
        tiny_model.generate(input_ids=ids, max_new_tokens=5, eos_token_id=None, do_sample=False)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert (gen_utils.StopCheck.__dict__["__call__"], gen_utils.DeferredStopCheck.__dict__["__call__"]) == before
    assert e2e.decode_wait_ms([9.0, 9.0, 0.001, 0.003]) == pytest.approx(2.0)
    assert e2e.decode_wait_ms([1.0, 2.0]) is None


def test_harness_core_loop_on_the_tiny_model(tiny_model, tmp_path):
    """Every row in bf16 and 4-bit with 3 new tokens, the table, its plot; the KV entries the floor assumes
    equal what the caches hold after generate."""
    from bench.common import write_results
    from sparsevila_ops.integrations import demo
    from sparsevila_ops.integrations import qwen2_5_vl as sv
    from sparsevila_ops.quant import W4Linear, quantize_model_linears

    model, steps = tiny_model, 3
    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    prompt = inputs["input_ids"].shape[1]
    bf16_bytes = e2e.decode_weight_bytes(model)
    raw = e2e.run_rows(model, inputs, list(e2e.ROWS), decode_steps=steps, precision="bf16", video=video)
    quantize_model_linears(model.model.language_model)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, W4Linear)
    assert e2e.decode_weight_bytes(model) < bf16_bytes
    raw += e2e.run_rows(model, inputs, list(e2e.ROWS), decode_steps=steps, precision="w4a16", video=video)
    assert [(r["precision"], r["row"]) for r in raw] == [(p, k) for p in e2e.PRECISIONS for k in e2e.ROWS]
    assert all(r["generated"] == steps and r["E_ms"] > 0 and r["P_ms"] > 0 and r["D_ms"] > 0 for r in raw)
    assert all(r["graphs_compiled_in_timed_run"] == 0 for r in raw)  # nothing compiles on the CPU
    assert [r["kept_visual"] for r in raw[:5]] == [36, 36, 9, 11, 4]
    table = e2e.assemble(raw, 1.0, e2e.kv_bytes_per_token(model.config.text_config))
    assert all(r["E2E_speedup"] is not None and r["D_floor_ms"] > 0 for r in table)
    assert getattr(model, "_sparsevila", None) is None and "_compiled_call" not in model.__dict__

    with torch.no_grad():  # the KV entries the floor counts are the ones the caches hold
        for key, (_, sp) in e2e.ROWS.items():
            if sp is not None:
                sv.enable(model, *sp)
            try:
                out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     return_dict_in_generate=True,
                                     **({"cache_implementation": "static"} if sp is None else {}))
            finally:
                if sp is not None:
                    sv.disable(model)
            cache = out.past_key_values
            if sp is None:
                held = int(cache.get_seq_length())
            else:
                held = int((cache.plengths if cache.sparse else cache.lengths)[0, 0])
            p, d = sp or (0.0, 0.0)
            assert e2e.decode_kv_tokens(prompt, 36, p, d, steps) == held - steps / 2 + 1, key
    d = write_results("e2e_smoke", table, e2e.COLUMNS, plot=e2e.plot_stacked(table), out_dir=str(tmp_path))
    assert (d / "e2e_smoke.png").stat().st_size > 1000
    assert "| 36 | 2 | 168 | bf16 | a |" in (d / "e2e_smoke.md").read_text()


def test_llava_onevision_videos_and_rows_on_the_tiny_model(monkeypatch):
    """``--model llava_onevision``: frames of 196 pooled tokens plus the newline; every row runs on the tiny model
    in bf16 and 4-bit, and the KV entries the floor counts (the newline never pruned by the prefill, a visual entry
    for select + pack) equal what the caches hold."""
    from sparsevila_ops import integrations
    from sparsevila_ops.integrations import demo
    from sparsevila_ops.quant import quantize_model_linears

    assert [e2e.video_for_tokens(t, model="llava_onevision") for t in e2e.TARGETS] == [
        {"frames": f, "h": 27, "w": 27, "px": 384, "visual_tokens": 196 * f + 1} for f in (84, 334, 669)]
    with pytest.raises(ValueError, match="model must be one of"):
        e2e.video_for_tokens(100, model="llava")
    tiny = copy.deepcopy(demo.LLAVA_OV_TINY)
    tiny["text_config"].update(hidden_size=128, intermediate_size=256, num_attention_heads=8)  # group-128 linears
    monkeypatch.setattr(demo, "LLAVA_OV_TINY", tiny)
    model, steps = demo.build_model(False, torch.device("cpu"), torch.bfloat16, "llava_onevision"), 3
    inputs = demo.video_inputs(model, 6, 0, 0, 8, "cpu", torch.bfloat16)
    prompt, n_vis = inputs["input_ids"].shape[1], 6 * 4 + 1  # 56 px frames: 4 x 4 patches pooled to 2 x 2
    video = {"frames": 6, "h": 4, "w": 4, "px": 56, "visual_tokens": n_vis}
    raw = e2e.run_rows(model, inputs, list(e2e.ROWS), decode_steps=steps, precision="bf16", video=video)
    assert [r["kept_visual"] for r in raw] == [n_vis, n_vis, 6, 7, 2]  # pooled tokens kept of 24 (+ the newline)
    assert all(r["generated"] == steps for r in raw)
    seen = []
    monkeypatch.setattr(e2e, "profile_kernels", lambda fn: (seen.append(fn()), ({"k": (4.0, 1)}, 4.0, {}, ()))[1])
    assert e2e.encoder_profile(model, inputs)["gpu_ms"] == 0.004  # the tower's pooled features of the 6 frames
    assert [tuple(f.shape) for f in seen[0].pooler_output] == [(6 * 4, 128)]
    with torch.no_grad():
        for key, (_, sp) in e2e.ROWS.items():
            if sp is None:
                continue
            integrations.enable(model, *sp)
            try:
                out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     return_dict_in_generate=True)
            finally:
                integrations.disable(model)
            cache = out.past_key_values
            held = int((cache.plengths if cache.sparse else cache.lengths)[0, 0])
            assert e2e.decode_kv_tokens(prompt, n_vis, *sp, steps, unpruned=1) == held - steps / 2 + 1, key
    quantize_model_linears(model.model.language_model)
    raw = e2e.run_rows(model, inputs, ["a", "c1"], decode_steps=steps, precision="w4a16", video=video)
    assert [(r["precision"], r["generated"]) for r in raw] == [("w4a16", steps)] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_main_without_a_gpu_skips_with_one_line(capsys):
    assert e2e.main(["--quick"]) == 0
    assert capsys.readouterr().out.strip() == "bench.e2e: needs a CUDA GPU; skipped"


@pytest.mark.parametrize("args,msg", [(["--tokens", "0"], "--tokens must be positive"),
                                      (["--decode-steps", "1"], "--decode-steps must be >= 2"),
                                      (["--rows", "z"], "invalid choice"), (["--precision", "fp8"], "invalid choice")])
def test_main_rejects_bad_flags(args, msg, capsys):
    with pytest.raises(SystemExit) as info:
        e2e.main(args)
    assert info.value.code == 2 and msg in capsys.readouterr().err


def test_kernel_kinds_and_per_step_kernels():
    assert [e2e.kernel_kind(n) for n in ("nvjet_tst_128x8_64x16_4x1_v_bz_TNT", "void gemv2T_kernel_val<...>",
                                         "_w4a16_kernel", "_decode_split_kernel", "decode_cluster_kernel",
                                         "_append_kv_kernel", "pytorch_flash::flash_fwd_splitkv_kernel",
                                         "triton_red_fused_add_mean_mul_pow_rsqrt_0", "void at::native::elementwise")
            ] == ["linear"] * 3 + ["attention"] * 4 + ["fused (inductor)", "other"]
    short = {"nvjet_a": (100.0, 4), "_decode_split_kernel": (40.0, 4), "triton_poi_x": (8.0, 8)}
    long = {"nvjet_a": (500.0, 20), "_decode_split_kernel": (200.0, 20), "triton_poi_x": (40.0, 40),
            "gemv2T_kernel": (32.0, 16), "prefill_only": (7.0, 0)}
    s = e2e.step_kernels((short, 140.0, {"Torch-Compiled Region": 800.0, "aten::argmax": 40.0},
                          (8.0, 4, 100.0, 1, 0.0, 0)),
                         (long, 700.0, {"Torch-Compiled Region": 4000.0, "aten::argmax": 200.0, "aten::copy_": 16.0},
                          (40.0, 20, 900.0, 17, 5e5, 1)), 16)
    assert (s["gap_launch_ms"], s["gaps_launch"], s["gap_host_ms"], s["gaps_host"]) == pytest.approx(
        (0.002, 1.0, 0.05, 1.0))
    assert s["stalls_ms"] == [0.0, 500.0]  # one-off: apart, never in the per-step difference
    assert s["host_ms"] == pytest.approx((3200 + 160 + 16) / 16 / 1e3)
    assert s["host_top_ms"] == {"Torch-Compiled Region": 0.2, "aten::argmax": 0.01, "aten::copy_": 0.001}
    assert s["gpu_ms"] == pytest.approx(560 / 16 / 1e3)
    assert s["kernel_sum_ms"] == pytest.approx((400 + 160 + 32 + 32) / 16 / 1e3)
    assert s["launches"] == pytest.approx((16 + 16 + 32 + 16) / 16)
    assert s["kinds_ms"] == pytest.approx({"linear": 0.027, "attention": 0.01, "fused (inductor)": 0.002})
    assert [t["kernel"] for t in s["top"]] == ["nvjet_a", "_decode_split_kernel", "triton_poi_x", "gemv2T_kernel"]


def test_host_ops_and_kernels_are_summed_from_the_decode_window_on():
    """Top-level host ops and kernels count from the first ``DECODE_MARK`` (the stopping criterion after the first
    token): a host wait for the prefill, or the prefill's kernels, are no decode step's; child ops are their
    parent's; without a mark everything counts."""
    from types import SimpleNamespace as NS
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    span = lambda a, b: NS(start=a, end=b, elapsed_us=lambda: b - a)  # noqa: E731
    ev = lambda name, dev, a, b, parent=None: NS(name=name, device_type=dev, time_range=span(a, b),  # noqa: E731
                                                 cpu_parent=parent)
    events = [ev("cudaEventSynchronize", cpu, 0, 900), ev("prefill_kernel", cuda, 10, 890),
              ev(e2e.DECODE_MARK, cpu, 900, 905), ev("aten::full", cpu, 901, 904, parent="mark"),
              ev("cudaEventSynchronize", cpu, 910, 930), ev("step_kernel", cuda, 905, 940),
              ev(e2e.DECODE_MARK, cpu, 950, 953), ev(e2e.DECODE_MARK, cuda, 905, 990)]
    events[-1].is_user_annotation = True  # the range's GPU side: not a kernel
    kernels, busy, host, gaps = e2e.summarize_events(events, e2e.DECODE_MARK)
    assert kernels == {"step_kernel": (35, 1)} and busy == 35 and gaps == (0.0, 0, 0.0, 0, 0.0, 0)
    assert host == {e2e.DECODE_MARK: 8, "cudaEventSynchronize": 20}
    kernels, busy, host, gaps = e2e.summarize_events(events)
    assert kernels == {"prefill_kernel": (880, 1), "step_kernel": (35, 1)} and busy == 880 + 35
    assert gaps == (0.0, 0, 15.0, 1, 0.0, 0) and host == {"cudaEventSynchronize": 920, e2e.DECODE_MARK: 8}
    assert e2e.summarize_events(events, "never") == ({}, 0.0, {}, (0.0, 0, 0.0, 0, 0.0, 0))


def test_stop_after_marks_each_token_for_the_profiler():
    from torch.profiler import ProfilerActivity, profile
    stop = e2e._StopAfter(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        done = [bool(stop(torch.zeros(1, n, dtype=torch.long), None)[0]) for n in (5, 6)]
    assert done == [False, True]
    assert sum(e.name == e2e.DECODE_MARK for e in prof.events()) == 2


def test_busy_time_is_the_union_of_kernel_intervals():
    assert e2e.busy_us([]) == 0.0
    assert e2e.busy_us([(0.0, 10.0), (5.0, 12.0), (20.0, 21.0)]) == 13.0  # a PDL kernel starts before its producer ends
    assert e2e.busy_us([(3.0, 4.0), (0.0, 10.0)]) == 10.0  # nested, unsorted


def test_idle_gaps_split_launch_latency_from_host_waits():
    assert e2e.idle_gaps([]) == (0.0, 0, 0.0, 0, 0.0, 0)
    spans = [(0.0, 10.0), (5.0, 12.0), (14.0, 20.0), (3.0, 4.0), (50.0, 51.0), (61.0, 62.0)]
    assert e2e.idle_gaps(spans) == (2.0 + 10.0, 2, 30.0, 1, 0.0, 0)  # 12->14 and 51->61 short, 20->50 long
    assert e2e.idle_gaps(spans, short_us=1.0) == (0.0, 0, 42.0, 3, 0.0, 0)
    assert e2e.idle_gaps(spans, short_us=1.0, stall_us=20.0) == (0.0, 0, 12.0, 2, 30.0, 1)  # 20->50 a stall


def test_decode_step_profile_stops_generate_after_each_length(tiny_model, monkeypatch):
    """The profiled runs stop after 4 (thrown away), 4 and 6 tokens through the stopping criterion (same
    max_new_tokens, so nothing is resized), and the row gets the per-step numbers and E's kernels; row (a) also
    gets the vision tower's."""
    from sparsevila_ops.integrations import demo
    lengths = []

    def fake_profile(fn, host_since=None):
        out = fn()
        if out is None and host_since == e2e.P_MARK:  # through_prefill (p_profile)
            return {"gemm_kernel": (7.0, 1)}, 7.0, {}, (1.0, 2, 4.0, 1, 0.0, 0)
        if out is None:  # until_llm (e_profile)
            return {"salience_kernel": (3.0, 1)}, 3.0, {}, (0.0, 0, 0.0, 0, 0.0, 0)
        if not isinstance(out, torch.Tensor):  # the vision tower's output (encoder_profile)
            return {"gemm_kernel": (5.0, 2)}, 5.0, {}, (0.0, 0, 0.0, 0, 0.0, 0)
        lengths.append(out.shape[1])
        return ({"k": (10.0 * out.shape[1], out.shape[1])}, 10.0 * out.shape[1], {"step": 20.0 * out.shape[1]},
                (1.0 * out.shape[1], out.shape[1], 0.0, 0, 0.0, 0))
    monkeypatch.setattr(e2e, "profile_kernels", fake_profile)
    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(tiny_model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    prompt = inputs["input_ids"].shape[1]
    rows = e2e.run_rows(tiny_model, inputs, ["a", "c1"], decode_steps=8, precision="bf16", video=video,
                        profile_steps=2)
    assert lengths == [prompt + 4, prompt + 4, prompt + 6] * 2
    assert all(r["D_gpu_ms"] == pytest.approx(0.01) and r["step"]["launches"] == 1 for r in rows)
    assert rows[0]["encoder"] == {"gpu_ms": 0.005, "kernel_sum_ms": 0.005, "launches": 2, "kinds_ms": {"gemm": 0.005},
                                  "top": [{"kernel": "gemm_kernel", "us": 5.0, "calls": 2}]}
    assert "encoder" not in rows[1]  # the tower is profiled at rows (a) and (b) only
    assert all(r["E_profile"]["top"] == [{"kernel": "salience_kernel", "us": 3.0, "calls": 1}] for r in rows)
    assert all(r["P_profile"]["gpu_ms"] == 0.007 and r["P_profile"]["gap_host_ms"] == 0.004
               and r["P_profile"]["gaps_launch"] == 2 and r["P_profile"]["kinds_ms"] == {"gemm": 0.007} for r in rows)
    assert e2e.assemble(rows, 1.0, 100)[1]["D_gpu_over_floor"] > 0


@pytest.mark.parametrize("stop", ["until_llm", "through_prefill"])
def test_profiles_stop_generate_at_the_language_model(tiny_model, stop):
    """E's profile runs ``generate`` up to the language model's first forward (the pruning ran, the LLM did not),
    P's through it (once, the prefill, inside the ``P_MARK`` range); the next ``generate`` of the same enabled model
    runs normally, with the output of one never stopped."""
    from torch.profiler import ProfilerActivity, profile

    from sparsevila_ops.integrations import demo
    from sparsevila_ops.integrations import qwen2_5_vl as sv

    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(tiny_model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    run = getattr(e2e, stop)
    sv.enable(tiny_model, 0.5, 0.5, cuda_graph=False)
    try:
        want = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False)
        calls = []
        hook = tiny_model.model.language_model.register_forward_hook(lambda *a: calls.append(1))
        tiny_model._sparsevila.last_kept = None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(tiny_model, lambda: tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False))
        hook.remove()
        assert calls == ([] if stop == "until_llm" else [1]) and tiny_model._sparsevila.last_kept is not None
        marks = [e.time_range.elapsed_us() for e in prof.events() if e.name == e2e.P_MARK]
        assert len(marks) == (stop == "through_prefill") and all(us > 0 for us in marks)
        assert torch.equal(tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False), want)
        with pytest.raises(RuntimeError, match="without a forward of the language model"):
            run(tiny_model, lambda: None)
    finally:
        sv.disable(tiny_model)


def test_time_until_llm_is_the_wall_time_up_to_the_language_model(monkeypatch):
    """An extra E run: the clock read before ``generate`` and after it stopped at the LLM's first forward (what
    follows never runs), the hook removed."""
    from types import SimpleNamespace
    lm = torch.nn.Identity()
    model = SimpleNamespace(model=SimpleNamespace(language_model=lm))
    clock, after = [10.0], []

    def generate():
        clock[0] += 0.25
        lm(torch.zeros(1))
        after.append(1)
        clock[0] += 100.0
    monkeypatch.setattr(e2e.time, "perf_counter", lambda: clock[0])
    assert e2e.time_until_llm(model, generate) == pytest.approx(250.0) and after == []
    assert not lm._forward_pre_hooks


def test_run_rows_e_is_the_median_of_the_timed_run_and_the_repeats(tiny_model, monkeypatch):
    """Without profiling too, each row runs ``E_REPEATS`` more ``generate`` calls up to the LLM while the row is
    enabled; E is the median of those and the timed run's E, all kept in ``E_samples_ms`` (not a table column)."""
    from sparsevila_ops.integrations import demo
    real, repeats, enabled = e2e.time_until_llm, iter([0.0, 1e9, 1e8, 2e8]), []

    def fake(model, generate):
        enabled.append(getattr(model, "_sparsevila", None) is not None)
        real(model, generate)  # the repeat runs and stops at the LLM (else RuntimeError)
        return next(repeats)
    monkeypatch.setattr(e2e, "E_REPEATS", 2)
    monkeypatch.setattr(e2e, "time_until_llm", fake)
    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(tiny_model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    rows = e2e.run_rows(tiny_model, inputs, ["a", "c1"], decode_steps=3, precision="bf16", video=video)
    assert enabled == [False, False, True, True]  # row (a) is stock transformers, (c1) ours
    timed = [r["E_samples_ms"][0] for r in rows]
    assert all(0 < t < 1e8 for t in timed)
    assert rows[0]["E_samples_ms"] == [timed[0], 0.0, 1e9] and rows[0]["E_ms"] == timed[0]
    assert rows[1]["E_samples_ms"] == [timed[1], 1e8, 2e8] and rows[1]["E_ms"] == 1e8  # the timed run is the outlier
    assert "E_samples_ms" not in e2e.COLUMNS


def test_bench_mrope_positions_runs_and_checks(tmp_path):
    """``bench.mrope_positions`` at small sizes on the CPU: both functions agree and a row per size is written."""
    from bench import mrope_positions
    assert mrope_positions.main(["--tokens", "256", "512", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mrope_positions.json").read_text())["rows"]
    assert [r["prompt_tokens"] for r in rows] == [256 + 78, 512 + 78] and all(r["mrope_positions_ms"] > 0 for r in rows)


def test_run_rows_reads_the_gpu_per_stage_of_the_timed_run(tiny_model, monkeypatch):
    """Each stage's readings are the ones stamped inside it: a fake NVML that counts up, read every 0.5 ms while
    the vision tower's and the LLM's forwards each take >= 10 ms, so every stage has readings, in order."""
    import time
    from bench import common
    from sparsevila_ops.integrations import demo
    clock = iter(range(1000, 10 ** 9))
    monkeypatch.setattr(common, "nvml_reader", lambda device=None: lambda: (next(clock), 500.0, 0x4, 700.0))
    monkeypatch.setattr(e2e, "GPU_SAMPLE_S", 0.0005)
    video = e2e.video_for_tokens(36, side=12)
    inputs = demo.video_inputs(tiny_model, video["frames"], video["h"], video["w"], 8, "cpu", torch.bfloat16)
    slow = [m.register_forward_hook(lambda *a: time.sleep(0.01))
            for m in (tiny_model.model.visual, tiny_model.model.language_model)]
    try:
        rows = e2e.run_rows(tiny_model, inputs, ["c1"], decode_steps=3, precision="bf16", video=video)
    finally:
        for h in slow:
            h.remove()
    got = rows[0]["gpu"]
    assert set(got) == {"E", "P", "D"} and all(got[p]["readings"] >= 1 for p in "EPD")
    assert got["E"]["power_capped_share"] == 1.0 and got["E"]["power_limit_w"] == 700.0
    assert got["E"]["sm_clock_median_mhz"] < got["P"]["sm_clock_median_mhz"] < got["D"]["sm_clock_median_mhz"]
    assert [rows[0][f"{p}_sm_mhz"] for p in "EPD"] == [got[p]["sm_clock_median_mhz"] for p in "EPD"]


def test_phase_readings_selects_each_stage_between_its_marks():
    from bench.common import GpuSampler
    gpu = GpuSampler(read=lambda: None)
    gpu.samples = [(0.5, 1000, 100.0, 0, 700.0), (1.5, 1500, 600.0, 0x4, 700.0), (2.5, 1900, 300.0, 0, 700.0)]
    got = e2e.phase_readings(gpu, (0.0, 1.0, 2.0, 3.0))
    assert [got[p]["sm_clock_median_mhz"] for p in "EPD"] == [1000, 1500, 1900]
    assert [got[p]["power_capped_share"] for p in "EPD"] == [0.0, 1.0, 0.0]
    assert e2e.phase_readings(gpu, (3.0, 4.0, 5.0, 6.0)) == {"E": {}, "P": {}, "D": {}}
