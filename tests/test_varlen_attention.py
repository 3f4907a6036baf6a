"""``integrations.attention.varlen_attention``: the route per segmenting, and both routes against float64 math."""
import pytest
import torch

from sparsevila_ops.integrations import attention as attn


def _reference(q, k, v, lens, scale):
    out, start = [], 0
    for n in lens:
        s = slice(start, start + n)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) * scale, dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", p, v[s].double()))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lens, need_lse, route", [
    ([64] * 3, False, "prefill"),  # Qwen2.5-VL windows: prefill_attention measured faster
    ([attn.SDPA_MIN_SEGMENT] * 2, False, "sdpa"),  # frames
    ([80, 3, 0, 77], False, "prefill"),  # uneven, an empty segment
    ([attn.SDPA_MIN_SEGMENT] * 2, True, "prefill"),  # the LSE only prefill_attention gives
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
    torch.testing.assert_close(out.double(), _reference(q, k, v, lens, D ** -0.5), rtol=1e-4, atol=1e-4)
