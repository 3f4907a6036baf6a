"""The benchmark-only decode instrumentation: ``bench/decode_floor.py`` keeps a copy of the Triton split kernel
that stamps every program (%globaltimer, SM id); the library's kernel has no timeline. ``bench/decode_timeline.py``
passes the cuda kernel its (otherwise null) timeline pointer."""
import pytest
import torch

from sparsevila_ops.autotune import default_config

from test_decode_triton import _check, _inputs, _outs


@pytest.mark.gpu
def test_decode_timeline_stamps_gpu():
    """Entry <= wait released <= exit (ns) and a valid SM id per split program; the output is the decode's."""
    from bench.decode_floor import decode_with_timeline
    B, Hk, G, ctx, D = 2, 4, 7, 8192, 128
    q, k, v = _inputs(B, Hk, G, ctx, D, torch.bfloat16, "cuda", seed=5)
    lengths = torch.tensor([ctx, 100], dtype=torch.int32, device="cuda")
    out, lse = _outs(q)
    S = 16
    cfg = {**default_config("decode_attention", q, k, v, lengths, D ** -0.5, out, lse), "NUM_SPLITS": S}
    stamps = torch.full((B, Hk, S, 4), -1, dtype=torch.int64, device="cuda")
    decode_with_timeline(q, k, v, lengths, D ** -0.5, out, lse, stamps, cfg)
    _check(out, lse, q, k, v, lengths, D ** -0.5, "decode with timeline")
    t = stamps.view(-1, 4).cpu()
    assert (t[:, 0] > 0).all() and (t[:, 1] >= t[:, 0]).all() and (t[:, 2] >= t[:, 1]).all()
    assert (t[:, 2] - t[:, 0]).max() < 10 ** 8  # one launch, well under 0.1 s
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ((t[:, 3] >= 0) & (t[:, 3] < sms)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the cuda backend needs sm_90+")
def test_cuda_decode_timeline_stamps_gpu():
    """bench/decode_timeline.py launches the cuda kernel itself with a timeline (here 2 clusters per row, so the
    combine kernel runs too): every CTA's phase clocks are non-decreasing and the output is the decode's. Every
    CTA gets keys (a CTA without any never records the first-tile stamp)."""
    from bench.decode_timeline import TIMELINE_STAMPS, decode_with_timeline
    B, Hk, G, ctx, D = 2, 4, 7, 8192, 128
    q, k, v = _inputs(B, Hk, G, ctx, D, torch.bfloat16, "cuda", seed=6)
    lengths = torch.tensor([ctx, 7000], dtype=torch.int32, device="cuda")
    out, lse = _outs(q)
    cluster, per_row = 4, 2
    stamps = torch.zeros(B * Hk, cluster * per_row, TIMELINE_STAMPS + 2, dtype=torch.int64, device="cuda")
    decode_with_timeline(q, k, v, lengths, D ** -0.5, out, lse, stamps, cluster, per_row, 8, True)
    _check(out, lse, q, k, v, lengths, D ** -0.5, "cuda decode with timeline")
    t = stamps.view(-1, TIMELINE_STAMPS + 2).cpu()
    assert (t[:, 1:TIMELINE_STAMPS] >= t[:, :TIMELINE_STAMPS - 1]).all()
    assert (t[:, TIMELINE_STAMPS + 1] >= t[:, TIMELINE_STAMPS]).all() and (t[:, TIMELINE_STAMPS] > 0).all()
