"""``integrations.attention.varlen_attention``: the route per segmenting, and both routes against float64 math."""
import pytest
import torch

from sparsevila_ops.integrations import attention as attn


def _reference(q, k, v, lens, scale):
    """(out [T, H, D], lse [H, T]) in float64."""
    out, lse, start = [], [], 0
    for n in lens:
        s = slice(start, start + n)
        logits = torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) * scale
        out.append(torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v[s].double()))
        lse.append(torch.logsumexp(logits, dim=-1))
        start += n
    return torch.cat(out), torch.cat(lse, dim=1)


@pytest.mark.parametrize("lens, need_lse, route", [
    ([64] * 3, False, "prefill"),  # Qwen2.5-VL windows: prefill_attention measured faster
    ([attn.SDPA_MIN_SEGMENT] * 2, False, "sdpa"),  # frames
    ([80, 3, 0, 77], False, "prefill"),  # uneven, an empty segment
    ([attn.SDPA_MIN_SEGMENT] * 2, True, "sdpa"),  # a salience layer's frames: SDPA's kernel with its LSE
    ([64] * 3, True, "prefill"),
])
def test_varlen_attention_routes_and_matches_float64(monkeypatch, lens, need_lse, route):
    torch.manual_seed(0)
    T, H, D = sum(lens), 2, 16
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    cu = torch.tensor([0] + lens).cumsum(0)
    taken = []
    sdpa, prefill = attn.batched_sdpa, attn.prefill_attention
    monkeypatch.setattr(attn, "batched_sdpa", lambda *a: taken.append("sdpa") or sdpa(*a))
    monkeypatch.setattr(attn, "prefill_attention", lambda *a, **kw: taken.append("prefill") or prefill(*a, **kw))
    out, lse = attn.varlen_attention(q, k, v, cu, lens, D ** -0.5, need_lse=need_lse)
    assert taken == [route] and (lse is not None) == need_lse
    want, want_lse = _reference(q, k, v, lens, D ** -0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    if need_lse:
        assert lse.dtype == torch.float32 and lse.shape == (H, T) and lse.is_contiguous()
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_an_lse_kernel_that_raises_falls_back_to_prefill_attention_with_one_warning(monkeypatch, caplog):
    lens = [attn.SDPA_MIN_SEGMENT] * 2
    q, k, v = (torch.randn(sum(lens), 2, 16) for _ in range(3))
    cu = torch.tensor([0] + lens).cumsum(0)

    def refuse(*a):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(attn, "batched_sdpa", refuse)
    monkeypatch.setattr(attn, "_SDPA_LSE_REFUSED", set())
    with caplog.at_level("WARNING", logger="sparsevila_ops"):
        out, lse = attn.varlen_attention(q, k, v, cu, lens, 0.25, need_lse=True)
        attn.varlen_attention(q, k, v, cu, lens, 0.25, need_lse=True)
    assert [r.getMessage() for r in caplog.records] == [
        "sparsevila_ops: SDPA's LSE kernel refused cpu torch.float32 D=16 (no kernel for this GPU); "
        "prefill_attention instead"]
    want, want_lse = _reference(q, k, v, lens, 0.25)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(attn, "batched_sdpa", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):
        attn.varlen_attention(q, k, v, cu, lens, 0.25, need_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("D", (72, 80))
def test_batched_sdpa_lse_on_cuda_matches_prefill_attention(dtype, D):
    """cuDNN's LSE (the half-precision route) equals ``prefill_attention``'s for SigLIP / Qwen2.5-VL frames; fp32
    takes ``prefill_attention``."""
    torch.manual_seed(0)
    lens, H = [729] * 3, 16
    q, k, v = (torch.randn(sum(lens), H, D, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
    assert attn.sdpa_gives_lse(q) == (dtype != torch.float32)
    out, lse = attn.varlen_attention(q, k, v, cu, lens, D ** -0.5, need_lse=True)
    want, want_lse = attn.prefill_attention(q, k, v, cu.int(), cu.int(), 729, 729, scale=D ** -0.5, causal=False)
    assert lse.shape == (H, sum(lens)) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
