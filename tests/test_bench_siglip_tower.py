"""bench.siglip_tower's rows on the CPU (a tiny SigLIP config, a fake timer): each compares what it claims to."""
import pytest
import torch

pytest.importorskip("transformers")
from bench import siglip_tower as st  # noqa: E402


def test_layer_rows_compare_permuted_and_contiguous_activations():
    from transformers import SiglipVisionConfig
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=56, patch_size=14)
    cfg._attn_implementation = "sdpa"
    rows = st._layer(2, lambda fn: (fn(), 4.0)[1], device="cpu", cfg=cfg)
    assert [r["variant"] for r in rows] == ["permuted activations (transformers)", "contiguous activations (enable)"]
    assert [r["per_encoder_ms"] for r in rows] == [12.0, 12.0] and rows[1]["speedup"] == 1.0
    assert rows[1]["bitwise_equal"] is True


def test_pooling_rows_compare_transformers_and_channels_last():
    rows = st._pooling(3, 1e12, lambda fn: (fn(), 2.0)[1], device="cpu", side=5, dim=24)
    assert [r["step"] for r in rows] == ["video pooling"] * 2 and rows[1]["bitwise_equal"] is True
    assert rows[0]["floor_ms"] == rows[1]["floor_ms"] == (3 * 25 * 24 + 3 * 9 * 24) * 2 / 1e12 * 1e3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_without_a_gpu_it_skips_with_one_line(capsys):
    assert st.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.siglip_tower: needs a CUDA GPU; skipped"
