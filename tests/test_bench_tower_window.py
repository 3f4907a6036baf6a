"""bench/tower_window.py on the tiny Qwen2.5-VL config (CPU: the tower's Triton path forced, the interpreter runs
``window_attention``): the first window block's arguments are captured, described and reproduced synthetically."""
from __future__ import annotations

import pytest
import torch

from bench import tower_window as tw


@pytest.fixture
def tower(device, monkeypatch):
    from sparsevila_ops.integrations import enable, qwen2_5_vl
    from sparsevila_ops.integrations.demo import build_model, video_inputs
    monkeypatch.setattr(qwen2_5_vl, "triton_elementwise", lambda *a: True)
    model = enable(build_model(False, device, torch.bfloat16))
    inputs = video_inputs(model, 2, 12, 8, 4, device, torch.bfloat16)  # 12 x 8 patches: windows of 8 x 8 and 4 x 8
    return model.model.visual, inputs["pixel_values_videos"], inputs["video_grid_thw"]


def test_capture_describe_and_synthetic_inputs(tower):
    from sparsevila_ops import prefill_attention
    from sparsevila_ops.triton_kernels import vision
    visual, pix, grid = tower
    args = tw.capture(visual, pix, grid)
    assert vision.window_attention is not None and vision.window_attention.__name__ == "window_attention"
    T = 12 * 8
    assert args["qkv"].shape == (T, 3, 2, 16) and args["cos"].shape == (T, 16)
    info = tw.describe(args)
    assert (info["windows"], info["window_min"], info["window_max"], info["windows_not_64"]) == (2, 32, 64, 1)
    # the captured arguments reproduce the tower's computation: rotary, then attention within each window
    q, k = vision.rotary_qk(args["qkv"][:, 0], args["qkv"][:, 1], args["cos"], args["sin"])
    want = prefill_attention(q, k, args["qkv"][:, 2], args["cu_seqlens"], args["cu_seqlens"], 64, 64,
                             scale=args["scale"], causal=False)[0]
    torch.testing.assert_close(tw._call(args).float(), want.float(), rtol=2e-2, atol=2e-2)
    syn = tw.synthetic_like(args)
    assert syn["qkv"].shape == args["qkv"].shape and syn["cos"].is_contiguous() and syn["sin"].dtype == torch.float32
    assert syn["cu_seqlens"].tolist() == [0, 64, T] and syn["max_seqlen"] == 64
    assert tw._call(syn).shape == (T, 2, 16)


def test_capture_refuses_a_tower_that_never_calls_the_kernel(tower, monkeypatch):
    from sparsevila_ops.integrations import qwen2_5_vl
    monkeypatch.setattr(qwen2_5_vl, "triton_elementwise", lambda *a: False)
    with pytest.raises(RuntimeError, match="never called window_attention"):
        tw.capture(*tower)


def test_without_a_gpu_it_skips_with_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert tw.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.tower_window: needs a CUDA GPU; skipped"


class _FakeEvent:
    """A timing event on the host clock (the CPU has no CUDA events)."""

    def record(self):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_timed_calls_time_every_window_block_and_restore_the_kernel(tower, device):
    from sparsevila_ops.triton_kernels import vision
    real = vision.window_attention
    event = _FakeEvent if device.type == "cpu" else None
    times = tw.timed_calls(*tower, event=event)
    assert len(times) == 2 and all(t > 0 for t in times)  # the tiny tower: blocks 0 and 2 window, 1 and 3 full
    assert vision.window_attention is real
