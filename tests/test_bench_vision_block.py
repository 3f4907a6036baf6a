"""bench.vision_block's steps on the CPU (reference backends, a fake timer): each compares what it claims to."""
import torch

from bench import vision_block as vb


def test_attention_rows_check_prefill_against_the_batched_sdpa_per_segment_length():
    qkv = torch.randn(2048, 3, vb.HEADS, vb.HEAD_DIM, dtype=torch.bfloat16)
    timed = []
    rows = vb._attention(qkv, lambda fn: (timed.append(fn()), 2.0)[1])
    assert [(r["step"], r["variant"]) for r in rows] == [
        (f"attention, {n}-patch segments", v) for n in (vb.WINDOW, vb.FRAME)
        for v in ("batched SDPA", "prefill_attention (one varlen launch)")]
    assert [r["per_encoder_ms"] for r in rows] == [2.0 * (vb.BLOCKS - vb.FULL_BLOCKS)] * 2 + [2.0 * vb.FULL_BLOCKS] * 2
    assert [r["varlen_attention"] for r in rows] == ["prefill"] * 2 + ["batched SDPA"] * 2
    assert len(timed) == 4 and all(r.get("speedup", 1.0) == 1.0 for r in rows)
