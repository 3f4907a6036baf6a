"""Kernels launch on their tensors' device, not on the current one: Triton and the CUDA launchers launch on the
current CUDA device, which a model split over GPUs (``device_map``) leaves at ``cuda:0`` while a layer's tensors
are on ``cuda:1``. The ops' dispatch and the integrations' direct launchers run under ``_device.device_guard``.

CPU: the guard's choice with the current device faked. GPU with two devices: ops and vision kernels on ``cuda:1``
while ``cuda:0`` is current give what the same calls give with ``cuda:1`` current (unguarded, Triton refuses the
pointers of another device, and a CUDA launch on another device's stream fails); the integration's own decode
graphs (``step_graph``) captured and replayed on the model's device."""
import contextlib

import pytest
import torch

from sparsevila_ops import _device


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    with _device.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [1]
    for same_or_other in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        assert isinstance(_device.device_guard(same_or_other), contextlib.nullcontext)
    assert entered == [1]


def test_on_tensor_device_guards_by_the_first_argument_and_keeps_the_launcher(monkeypatch):
    seen = []
    monkeypatch.setattr(_device, "device_guard", lambda device: seen.append(device) or contextlib.nullcontext())

    @_device.on_tensor_device
    def launcher(x, y, *, scale=1.0):
        """doc"""
        return x * y * scale
    got = launcher(torch.ones(2), torch.full((2,), 3.0), scale=2.0)
    assert got.tolist() == [6.0, 6.0] and seen == [torch.device("cpu")]
    assert launcher.__name__ == "launcher" and launcher.__doc__ == "doc"


def test_vision_launchers_are_guarded():
    from sparsevila_ops.triton_kernels import vision
    for name in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "rotary_qk", "rope_qk", "silu_mul",
                 "window_attention"):
        assert getattr(vision, name).__wrapped__.__name__ == name, name


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")


def _calls(dev: torch.device):
    """Each op family once on ``dev``: salience (cuda backend on sm_90), prefill, decode, gemv, two vision kernels."""
    import sparsevila_ops as so
    from sparsevila_ops.triton_kernels import vision
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dev, dt)  # noqa: E731
    T, H, D = 300, 4, 64
    q, k, v = rnd(T, H, D), rnd(T, H, D), rnd(T, H, D)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=dev)
    kc, vc = rnd(1, 2, 512, 128), rnd(1, 2, 512, 128)
    x, w = rnd(1, 1024), rnd(768, 1024)
    h = rnd(257, 1280)
    return [so.visual_salience(q, k, cu, 200, deterministic=True),
            so.prefill_attention(q, k, v, cu, cu, 200, 200)[0],
            so.decode_attention(rnd(1, 8, 128), kc, vc, torch.tensor([400], dtype=torch.int32, device=dev))[0],
            so.gemv(x, w),
            vision.rms_norm(h, rnd(1280), 1e-6),
            vision.silu_mul(h, rnd(257, 1280))]


@pytest.mark.gpu
@two_gpus
def test_ops_on_a_device_that_is_not_the_current_one():
    other = torch.device("cuda", 1)
    with torch.cuda.device(1):
        want = _calls(other)
    torch.cuda.synchronize(other)
    assert torch.cuda.current_device() == 0
    got = _calls(other)
    torch.cuda.synchronize(other)
    for i, (a, b) in enumerate(zip(got, want)):  # launched on cuda:0, they would fail or read another device
        assert a.device == other, i
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, msg=f"call {i}")


@pytest.mark.gpu
@two_gpus
def test_step_graph_captures_and_replays_on_the_model_device():
    """The integration's own decode graphs for a model on ``cuda:1`` while ``cuda:0`` is current: captured on and
    replayed from ``cuda:1``'s stream (torch uses the current device's), the tokens of inductor's trees."""
    from qwen_tiny import tiny_model, visual_inputs
    from sparsevila_ops.integrations import qwen2_5_vl as sv
    other = torch.device("cuda", 1)
    model = tiny_model(seed=4, device=other, dtype=torch.bfloat16)
    inputs = visual_inputs(seed=5, device=other, dtype=torch.bfloat16)
    got = []
    for step_graph in (False, True, True):
        sv.enable(model, 0.5, 0.9, step_graph=step_graph)
        try:
            with torch.no_grad():
                got.append(model.generate(**inputs, max_new_tokens=8, do_sample=False))
        finally:
            sv.disable(model)
            torch._dynamo.reset()
    assert torch.cuda.current_device() == 0
    assert all(torch.equal(g, got[0]) for g in got[1:])
