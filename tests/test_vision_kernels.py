"""The vision encoder's element-wise kernels (``triton_kernels/vision.py``) against the transformers modules they
replace (``Qwen2_5_VLRMSNorm`` and the residual add before it, ``apply_rotary_pos_emb_vision``, ``act_fn(gate) *
up``): awkward sizes, strided views, bf16 / fp32, weight dtypes that promote; on the CPU under Triton's
interpreter."""
import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from sparsevila_ops.triton_kernels import vision

from helpers import assert_rel


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("N", [48, 100])
def test_rms_norm_matches_the_module(device, dtype, wdtype, N):
    g = torch.Generator().manual_seed(N)
    norm = hf.Qwen2_5_VLRMSNorm(N, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N, generator=g) * 0.5 + 1)
    norm = norm.to(device, wdtype)
    store = (torch.randn(3, 7, N + 9, generator=g) * 3).to(device, dtype)
    x = store[..., 5:5 + N]  # rows 9 elements apart
    want = norm(x)
    got = vision.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_rel(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, f"rms_norm {dtype} w {wdtype} N={N}")
    assert vision.rms_norm(x[:0], norm.weight, 1e-6).shape == (0, 7, N)
    with pytest.raises(ValueError, match="weight must have shape"):
        vision.rms_norm(x, norm.weight[:-1], 1e-6)


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32)])
@pytest.mark.parametrize("N", [48, 100])
def test_add_rms_norm_equals_the_add_then_the_module(device, dtype, wdtype, N):
    """``x + r`` bit for bit (eager's rounding of the sum), and the module's norm of that sum; strided rows."""
    g = torch.Generator().manual_seed(N + 1)
    norm = hf.Qwen2_5_VLRMSNorm(N, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N, generator=g) * 0.5 + 1)
    norm = norm.to(device, wdtype)
    store = (torch.randn(2, 3, 7, N + 9, generator=g) * 3).to(device, dtype)
    x, r = store[0, ..., 5:5 + N], store[1, ..., 2:2 + N]
    want_s = x + r
    want = norm(want_s)
    s, got = vision.add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
    assert torch.equal(s, want_s) and s.is_contiguous()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_rel(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, f"add_rms_norm {dtype} w {wdtype} N={N}")
    assert [t.shape for t in vision.add_rms_norm(x[:0], r[:0], norm.weight, 1e-6)] == [(0, 7, N)] * 2
    with pytest.raises(ValueError, match="one shape and dtype"):
        vision.add_rms_norm(x, r.double(), norm.weight, 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        vision.add_rms_norm(x, r, norm.weight[:-1], 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [48, 100])
def test_add_layer_norm_equals_the_add_then_the_module(device, dtype, N):
    g = torch.Generator().manual_seed(N + 2)
    norm = torch.nn.LayerNorm(N, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N, generator=g) * 0.5 + 1)
        norm.bias.copy_(torch.randn(N, generator=g))
    norm = norm.to(device, dtype)
    store = (torch.randn(2, 3, 7, N + 9, generator=g) * 3 + 5).to(device, dtype)  # a mean far from 0
    x, r = store[0, ..., 5:5 + N], store[1, ..., 2:2 + N]
    with torch.no_grad():
        want = norm(x + r)
    s, got = vision.add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)
    assert torch.equal(s, x + r) and s.is_contiguous() and got.dtype == dtype
    assert_rel(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, f"add_layer_norm {dtype} N={N}")
    assert [t.shape for t in vision.add_layer_norm(x[:0], r[:0], norm.weight, norm.bias, 1e-6)] == [(0, 7, N)] * 2
    with pytest.raises(ValueError, match="one shape and dtype"):
        vision.add_layer_norm(x, r[..., :-1], norm.weight, norm.bias, 1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        vision.add_layer_norm(x, r, norm.weight, norm.bias[:-1], 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [48, 100])
def test_layer_norm_matches_the_module(device, dtype, N):
    g = torch.Generator().manual_seed(N)
    norm = torch.nn.LayerNorm(N, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(N, generator=g) * 0.5 + 1)
        norm.bias.copy_(torch.randn(N, generator=g))
    norm = norm.to(device, dtype)
    store = (torch.randn(3, 7, N + 9, generator=g) * 3 + 5).to(device, dtype)  # a mean far from 0
    x = store[..., 5:5 + N]  # rows 9 elements apart
    with torch.no_grad():
        want = norm(x)
    got = vision.layer_norm(x, norm.weight, norm.bias, norm.eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_rel(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, f"layer_norm {dtype} N={N}")
    assert vision.layer_norm(x[:0], norm.weight, norm.bias, 1e-6).shape == (0, 7, N)
    with pytest.raises(ValueError, match="bias must have shape"):
        vision.layer_norm(x, norm.weight, norm.bias[:-1], 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        vision.layer_norm(x, norm.weight.float() if dtype != torch.float32 else norm.weight.double(), norm.bias, 1e-6)


@pytest.mark.parametrize("D", [64, 72, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hk", [3, 1])  # k with q's heads (alternating blocks), or fewer (k's blocks run out first)
def test_rotary_qk_matches_apply_rotary_pos_emb_vision(device, D, dtype, hk):
    """One launch for q and k: 37 tokens span several programs of q and k, one boundary inside a token."""
    T, H = 37, 3
    g = torch.Generator().manual_seed(D)
    qkv = torch.randn(T, 3, H, D, generator=g).to(device, dtype)
    q, k = qkv[:, 0], qkv[:, 1, :hk]  # strided views, as the vision attention's qkv split gives them
    freqs = torch.randn(T, D // 2, generator=g).to(device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    want_q, want_k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    got_q, got_k = vision.rotary_qk(q, k, cos, sin)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert got_q.dtype == dtype and got_q.is_contiguous()
    assert_rel(got_q, want_q, tol, f"rotary q D={D}")
    assert_rel(got_k, want_k, tol, f"rotary k D={D}")
    assert got_k.shape == (T, hk, D) and got_k.is_contiguous()
    with pytest.raises(ValueError, match="cos, sin must be"):
        vision.rotary_qk(q, k, cos[:, :-2], sin[:, :-2])


@pytest.mark.parametrize("D", [16, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_qk_equals_apply_rotary_pos_emb_bit_for_bit(device, D, dtype):
    """A decoder prefill's q, k as the views of a fused q/k/v projection ``[B, L, (Hq + 2 Hk) D]`` (B = 2, GQA 4 / 2),
    cos, sin ``[B, L, D]`` in the same dtype: the same bits as transformers' ``apply_rotary_pos_emb``, token-major
    outputs."""
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    B, L, Hq, Hk = 2, 7, 4, 2
    g = torch.Generator().manual_seed(D)
    qkv = (torch.randn(B, L, (Hq + 2 * Hk) * D, generator=g) * 4).to(device, dtype)
    q = qkv[..., :Hq * D].view(B, L, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, L, Hk, D).transpose(1, 2)
    freqs = torch.rand(B, L, D // 2, generator=g) * 300  # large angles: cos, sin over their whole range
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    want_q, want_k = qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = vision.rope_qk(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.shape == (B, Hq, L, D) and got_q.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="cos, sin must be"):
        vision.rope_qk(q, k, cos[..., :-2], sin[..., :-2])
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        vision.rope_qk(q.float(), k.float(), cos.float(), sin.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [40, 4100])  # one block of columns; two (the second partial)
def test_silu_mul_matches_eager(device, dtype, N):
    """The two halves of a fused gate/up output (row stride 2N), as the integration's MLP passes them."""
    g = torch.Generator().manual_seed(N)
    fused = (torch.randn(2, 3, 2 * N, generator=g) * 4).to(device, dtype)
    gate, up = fused.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = vision.silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert_rel(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, f"silu_mul {dtype} N={N}")
    assert vision.silu_mul(gate[:0], up[:0]).shape == (0, 3, N)
    with pytest.raises(ValueError, match="one shape and dtype"):
        vision.silu_mul(gate, up[..., :-1])


@pytest.mark.parametrize("D,dtype", [(80, torch.bfloat16), (80, torch.float32), (24, torch.bfloat16),
                                     (16, torch.float32)])  # split 64 + 16; padded to 32; one 16-wide tile
@pytest.mark.parametrize("hpp", [1, 3, 4])  # 3: the last program has one head of 4
def test_window_attention_equals_rotary_then_attention_per_window(device, D, dtype, hpp):
    """Uneven windows (a full 64, a ragged 17, an empty one, 1 token) of a fused qkv output's strided views: the
    rotated q, k of ``apply_rotary_pos_emb_vision``, then softmax attention inside each window, in fp32."""
    lens, H = [64, 17, 0, 40, 1, 64], 4
    T = sum(lens)
    g = torch.Generator().manual_seed(D + hpp)
    qkv = torch.randn(T, 3 * H * D, generator=g).to(device, dtype).view(T, 3, H, D)
    freqs = torch.randn(T, D // 2, generator=g) * 3
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(device), emb.sin().to(device)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    scale = D ** -0.5
    q, k = hf.apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
    q, k, v = q.double(), k.double(), qkv[:, 2].double()
    want = torch.empty(T, H, D, dtype=torch.float64, device=device)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
        want[a:b] = torch.einsum("hij,jhd->ihd", s.softmax(-1), v[a:b])
    got = vision.window_attention(qkv, cos, sin, cu, max(lens), scale, heads_per_program=hpp)
    assert got.shape == (T, H, D) and got.dtype == dtype and got.is_contiguous()
    assert_rel(got, want, 2e-2 if dtype == torch.bfloat16 else 1e-5, f"window_attention D={D} {dtype} hpp={hpp}")
    with pytest.raises(ValueError, match="max_seqlen must be in"):
        vision.window_attention(qkv, cos, sin, cu, vision.WINDOW_MAX + 1, scale)
    with pytest.raises(ValueError, match="heads_per_program must be"):
        vision.window_attention(qkv, cos, sin, cu, max(lens), scale, heads_per_program=0)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        vision.window_attention(qkv, cos, sin, cu.long(), max(lens), scale)
