"""bench.siglip_tower's rows on the CPU (a tiny SigLIP config, a fake timer): each compares what it claims to."""
import pytest
import torch

pytest.importorskip("transformers")
from bench import siglip_tower as st  # noqa: E402


def _tiny_cfg():
    from transformers import SiglipVisionConfig
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=60, patch_size=14)  # like 384 / 14: the stride drops the last pixels
    cfg._attn_implementation = "sdpa"
    return cfg


def test_layer_rows_compare_permuted_contiguous_and_the_layer_norm_kernels():
    pair = lambda fa, fb: (fa(), fb(), {"a_ms": 4.0, "b_ms": 3.0, "diff_ms": -0.8})[2]  # noqa: E731
    rows = st._layer(2, lambda fn: (fn(), 4.0)[1], pair, device="cpu", cfg=_tiny_cfg())
    assert [r["variant"] for r in rows] == ["permuted activations (transformers)", "contiguous activations",
                                            "contiguous, LayerNorm kernels", "LayerNorm kernels, adds apart",
                                            "adds fused into the LayerNorms (enable)"]
    assert [r["per_encoder_ms"] for r in rows] == [12.0] * 4 + [9.0]
    assert rows[1]["speedup"] == rows[2]["speedup"] == 1.0 and rows[4]["speedup"] == 4.0 / 3.0
    assert rows[4]["paired_diff_ms"] == -0.8
    assert rows[1]["bitwise_equal"] is True  # the CPU keeps the module's LayerNorm (no Triton element-wise)


def test_layer_rows_with_the_triton_layer_norms_forced(device, monkeypatch):
    """The kernels' rows as on a GPU (the Triton path forced; on a CPU the interpreter runs it): the fused layer's
    output and next LayerNorm are checked inside, and its output equals the unfused kernels' bit for bit."""
    from sparsevila_ops.integrations import fused
    from sparsevila_ops.triton_kernels import vision
    monkeypatch.setattr(fused, "triton_elementwise", lambda *a: True)
    calls, fused_adds = [], vision.add_layer_norm
    monkeypatch.setattr(vision, "add_layer_norm", lambda *a: (calls.append(1), fused_adds(*a))[1])

    def time(fn):  # records how many fused adds each timed call ran
        before = len(calls)
        fn()
        per_call.append(len(calls) - before)
        return 4.0
    per_call = []
    with torch.no_grad():
        rows = st._layer(2, time, lambda fa, fb: {"a_ms": time(fa), "b_ms": time(fb), "diff_ms": 0.0}, device=device,
                         cfg=_tiny_cfg())
    assert rows[4]["variant"] == "adds fused into the LayerNorms (enable)" and rows[4]["bitwise_equal"] is True
    assert per_call == [0, 0, 0, 0, 2]  # the "adds apart" row runs the layer's own forward, not the fused one


def test_gemm_and_layer_norm_and_salience_attention_rows(monkeypatch):
    from sparsevila_ops.integrations import vit
    monkeypatch.setattr(vit, "half_gemm", lambda *a: True)  # the GEMM paths on the CPU (CUDA-only in enable)
    cfg, time = _tiny_cfg(), lambda fn: (fn(), 3.0)[1]
    emb = st._patch_embedding(2, time, device="cpu", cfg=cfg)
    assert [r["variant"] for r in emb] == ["convolution (transformers)", "one GEMM, K padded 588 -> 592 (enable)"]
    ran = []
    pair = lambda fa, fb: (ran.extend([fa(), fb()]), {"a_ms": 3.0, "b_ms": 2.0, "diff_ms": -0.9})[1]  # noqa: E731
    mlp = st._mlp_gelu(2, pair, device="cpu", cfg=cfg)
    assert [r["per_encoder_ms"] for r in mlp] == [9.0, 6.0] and mlp[1]["speedup"] == 1.5
    assert mlp[1]["paired_diff_ms"] == -0.9 and len(ran) == 2
    torch.testing.assert_close(ran[1].float(), ran[0].float(), rtol=2e-2, atol=2e-2)  # the pair times the same MLP
    ln = st._layer_norm(2, 1e12, time, device="cpu", cfg=cfg)
    assert ln[0]["per_encoder_ms"] == 3.0 * 6 and ln[0]["floor_ms"] == 2 * 2 * 16 * 32 * 2 / 1e12 * 1e3
    att = st._salience_attention(2, time, device="cpu", cfg=cfg)
    assert [r["variant"] for r in att] == ["prefill_attention", "batched SDPA, cuDNN (enable)"]
    layer_att = st._layer_attention(2, time, device="cpu", cfg=cfg)  # the CPU has the flash kernel only
    assert [r["variant"] for r in layer_att] == ["default backend (transformers)", "flash_attention"]
    assert layer_att[1]["per_encoder_ms"] == 3.0 * cfg.num_hidden_layers and layer_att[1]["speedup"] == 1.0


def test_add_layer_norm_rows(device, monkeypatch):
    """Eager add + nn.LayerNorm, eager add + the kernel, and the fused kernel (the Triton path forced; on a CPU the
    interpreter runs it), each against the 4-pass floor; without the Triton path the fused row is left out."""
    from sparsevila_ops.integrations import fused
    cfg, time = _tiny_cfg(), lambda fn: (fn(), 2.0)[1]
    monkeypatch.setattr(fused, "triton_elementwise", lambda *a: True)
    with torch.no_grad():
        rows = st._add_layer_norm(2, 1e12, time, device=device, cfg=cfg)
    assert [r["variant"] for r in rows] == ["x + r, then nn.LayerNorm (transformers)",
                                            "x + r, then layer_norm_forward", "one kernel, add_layer_norm (enable)"]
    n = (cfg.image_size // cfg.patch_size) ** 2
    assert rows[2]["floor_ms"] == 4 * 2 * n * cfg.hidden_size * 2 / 1e12 * 1e3
    assert rows[2]["per_encoder_ms"] == 2.0 * 2 * cfg.num_hidden_layers
    monkeypatch.setattr(fused, "triton_elementwise", lambda *a: False)
    with torch.no_grad():
        assert len(st._add_layer_norm(2, 1e12, time, device=device, cfg=cfg)) == 2


def test_pooling_rows_compare_transformers_and_channels_last():
    rows = st._pooling(3, 1e12, lambda fn: (fn(), 2.0)[1], device="cpu", side=5, dim=24)
    assert [r["step"] for r in rows] == ["video pooling"] * 2 and rows[1]["bitwise_equal"] is True
    assert rows[0]["floor_ms"] == rows[1]["floor_ms"] == (3 * 25 * 24 + 3 * 9 * 24) * 2 / 1e12 * 1e3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_without_a_gpu_it_skips_with_one_line(capsys):
    assert st.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.siglip_tower: needs a CUDA GPU; skipped"
