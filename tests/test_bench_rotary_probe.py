"""bench/rotary_probe.py: the heads-loop rotary variant equals the production kernel at awkward sizes, on strided
q / k views, both rounding modes: bit for bit under Triton's interpreter (no FMA contraction there), within what FMA
contraction changes on a GPU. A broken variant is refused; a one-ulp difference is counted, not refused."""
from __future__ import annotations

import pytest
import torch

from bench import rotary_probe


@pytest.mark.parametrize("block_u", [16, 64])
def test_rotary_heads_equals_rotary_qk(device, block_u):
    g = torch.Generator().manual_seed(3)
    T = 37  # blocks end inside a token
    qkv = torch.randn(T, 3, 3, 24, generator=g).to(device, torch.bfloat16)  # q, k: strided views
    emb = torch.randn(T, 12, generator=g).repeat(1, 2).to(device)
    differ = rotary_probe.check(qkv[:, 0], qkv[:, 1], emb.cos(), emb.sin(), False, block_u)
    proj = torch.randn(T, 7 * 16, generator=g).to(device, torch.bfloat16)
    q, k = proj[:, :5 * 16].view(T, 5, 16), proj[:, 5 * 16:6 * 16].view(T, 1, 16)  # Hq 5, Hk 1
    pos = torch.randn(T, 8, generator=g).repeat(1, 2).to(device)
    differ += rotary_probe.check(q, k, pos.cos().bfloat16(), pos.sin().bfloat16(), True, block_u)
    if device.type == "cpu":
        assert differ == 0


def test_check_refuses_a_different_result(device, monkeypatch):
    qkv = torch.randn(9, 3, 2, 16).to(device, torch.bfloat16)
    emb = torch.randn(9, 8).repeat(1, 2).to(device)
    real = rotary_probe.rotary_heads
    monkeypatch.setattr(rotary_probe, "rotary_heads", lambda q, k, c, s, *a: real(q, k, c, -s, *a))
    with pytest.raises(AssertionError, match="refusing to time it"):
        rotary_probe.check(qkv[:, 0], qkv[:, 1], emb.cos(), emb.sin(), False, 16)


def test_check_counts_one_ulp_differences(device, monkeypatch):
    from sparsevila_ops.triton_kernels.vision import _rotary
    qkv = torch.randn(9, 3, 2, 16).to(device, torch.bfloat16)
    emb = torch.randn(9, 8).repeat(1, 2).to(device)

    def one_ulp_off(q, k, c, s, block_u, eager_round):  # the production kernel, one element of q nudged by one ulp
        oq, ok = _rotary(q, k, c, s, eager_round=eager_round)
        oq.view(torch.int16)[0, 0, 0] += 1  # the next bf16 away from zero
        return oq, ok

    monkeypatch.setattr(rotary_probe, "rotary_heads", one_ulp_off)
    assert rotary_probe.check(qkv[:, 0], qkv[:, 1], emb.cos(), emb.sin(), False, 16) == 1
