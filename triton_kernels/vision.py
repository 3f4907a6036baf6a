"""Triton kernels for the element-wise steps of a vision encoder block that eager PyTorch runs as chains of fp32
kernels: RMSNorm, LayerNorm, the vision rotary embedding and the MLP's SiLU gate (Qwen2.5-VL's
``Qwen2_5_VLRMSNorm``, SigLIP's ``nn.LayerNorm``, ``apply_rotary_pos_emb_vision`` and ``act_fn(gate) * up``), and of
a decoder's prefill (its RMSNorms, and ``apply_rotary_pos_emb``'s chain of half-precision kernels). Each reads its
inputs once and writes its outputs once, with the same math:

    rms_norm:   y = w * bf(x / sqrt(mean(x^2) + eps))       (x in fp32; bf(): back to x's dtype, as the module does)
    layer_norm: y = bf((x - mean(x)) / sqrt(var(x) + eps) * w + b)   (fp32 inside, biased variance, as F.layer_norm)
    rotary_qk:  o = x * cos + rotate_half(x) * sin, for x in (q, k)   (fp32; rotate_half(x) = [-x2, x1]; o in x's dtype)
    rope_qk:    the same for a decoder's q, k [B, H, L, D] in fp16 / bf16, each product and the sum rounded to it
    silu_mul:   h = bf(bf(g / (1 + exp(-g))) * u)             (fp32 inside, rounded as eager's two kernels round)

On the H200 at 128k visual tokens (524,288 patches of 1280 features) eager PyTorch spent 1.6 of the encoder's 3.8 s
in element-wise kernels (e2e's encoder profile; bench/NOTES.md). Used by the integration on CUDA tensors.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x, w, out, n_rows, stride_x, stride_o, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(x + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, 1) / N + eps)
    y = (v * inv[:, None]).to(x.dtype.element_ty).to(tl.float32)
    wv = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], (wv[None, :] * y).to(out.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape, last dim contiguous); the result has the dtype of
    ``weight * x`` (PyTorch's promotion), as the module's."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight must have shape ({N},) (the last dim of x); got {tuple(weight.shape)}")
    x2, BLOCK, ROWS = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, weight, out, x2.shape[0], x2.stride(0), out.stride(0),
                                                            float(eps), N=N, BLOCK=BLOCK, ROWS=ROWS, num_warps=4)
    return out.view(x.shape)


def _rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """``x`` as rows ``[-1, N]`` with unit column stride (a copy only when the last dim is strided), and a row
    kernel's BLOCK (N padded to a power of two) and ROWS per program (~4096 elements)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.shape[0] and x2.stride(1) != 1:
        x2 = x2.contiguous()
    BLOCK = triton.next_power_of_2(N)
    return x2, BLOCK, max(1, min(16, 4096 // BLOCK))


@triton.jit
def _layer_norm_kernel(x, w, b, out, n_rows, stride_x, stride_o, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(x + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, v - (tl.sum(v, 1) / N)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
    wv = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    bv = tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * wv[None, :] + bv[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (N,), weight, bias, eps)`` over the last dim of ``x`` (any leading shape, last dim
    contiguous), with ``weight``, ``bias`` ``[N]`` in x's dtype; the result is in x's dtype."""
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (N,) or t.dtype != x.dtype:
            raise ValueError(f"{name} must have shape ({N},) (the last dim of x) and x's dtype {x.dtype}; got "
                             f"{tuple(t.shape)} {t.dtype}")
    x2, BLOCK, ROWS = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _layer_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, weight, bias, out, x2.shape[0], x2.stride(0),
                                                              out.stride(0), float(eps), N=N, BLOCK=BLOCK, ROWS=ROWS,
                                                              num_warps=4)
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(x, cos, sin, out, H, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, EAGER_ROUND: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    c1 = tl.load(cos + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos + t * stride_ct + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin + t * stride_st + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin + t * stride_st + HALF + d, mask=dm, other=0.0).to(tl.float32)
    mask = (h < H)[:, None] & dm[None, :]
    src = x + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    a1, b1 = x1 * c1[None, :], (-x2) * s1[None, :]
    a2, b2 = x2 * c2[None, :], x1 * s2[None, :]
    if EAGER_ROUND:  # each product rounded to x's dtype, as eager's half-precision multiplies round (no FMA)
        ty = out.dtype.element_ty
        a1, b1, a2, b2 = a1.to(ty).to(tl.float32), b1.to(ty).to(tl.float32), a2.to(ty).to(tl.float32), \
            b2.to(ty).to(tl.float32)
    tl.store(dst, (a1 + b1).to(out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (a2 + b2).to(out.dtype.element_ty), mask=mask)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eager_round: bool = False) -> torch.Tensor:
    T, H, D = x.shape
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T and H:
        _rotary_kernel[(T,)](x, cos, sin, out, H, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                             out.stride(0), out.stride(1), HALF=D // 2, BLOCK_H=triton.next_power_of_2(H),
                             BLOCK_D=triton.next_power_of_2(D // 2), EAGER_ROUND=eager_round, num_warps=4,
                             enable_fp_fusion=not eager_round)  # fused, a product and its sum round once
    return out


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb_vision(q, k, cos, sin)``: q, k ``[T, H, D]`` (any strides, last dim contiguous), cos,
    sin ``[T, D]`` (rows contiguous); new contiguous outputs in q's and k's dtypes."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k must be [T, H, D] with equal T and D; got {tuple(q.shape)}, {tuple(k.shape)}")
    T, _, D = q.shape
    if D % 2 or cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(f"cos, sin must be [T, D] = [{T}, {D}] with D even; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    q, k, cos, sin = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    return _rotary(q, cos, sin), _rotary(k, cos, sin)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Llama-family decoder's ``apply_rotary_pos_emb(q, k, cos, sin)`` in half precision, bit for bit: q ``[B, Hq,
    L, D]``, k ``[B, Hk, L, D]`` fp16/bf16 (any strides, last dim contiguous: the views of a fused q/k/v
    projection), cos, sin ``[B, L, D]`` in their dtype; each product and the sum rounded to it as eager's kernels
    round. Returns ``[B, H, L, D]`` views of new token-major ``[B, L, H, D]`` tensors (rows of a varlen ``[T, H,
    D]`` layout)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k must be [B, H, L, D] with equal B, L, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, _, L, D = q.shape
    if D % 2 or cos.shape != (B, L, D) or sin.shape != (B, L, D):
        raise ValueError(f"cos, sin must be [B, L, D] = [{B}, {L}, {D}] with D even; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or {k.dtype, cos.dtype, sin.dtype} != {q.dtype}:
        raise TypeError(f"q, k, cos, sin must share one dtype, float16 or bfloat16; got {q.dtype}, {k.dtype}, "
                        f"{cos.dtype}, {sin.dtype}")
    c, s = (t.reshape(B * L, D) for t in (cos, sin))
    c, s = (t if t.shape[0] == 0 or t.stride(-1) == 1 else t.contiguous() for t in (c, s))
    outs = []
    for x in (q, k):
        rows = x.transpose(1, 2).reshape(B * L, x.shape[1], D)  # a view for a projection's output
        if rows.shape[0] and rows.stride(-1) != 1:
            rows = rows.contiguous()
        outs.append(_rotary(rows, c, s, eager_round=True).view(B, L, x.shape[1], D).transpose(1, 2))
    return outs[0], outs[1]


@triton.jit
def _silu_mul_kernel(gate, up, out, n_rows, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * stride_o + cols, (act * u).to(out.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass: gate, up ``[..., N]`` of one dtype and shape (any row strides, last dim
    contiguous: e.g. the two halves of a fused gate/up projection); a new contiguous result in their dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one shape and dtype; got {tuple(gate.shape)} {gate.dtype}, "
                         f"{tuple(up.shape)} {up.dtype}")
    N = gate.shape[-1]
    g2, u2 = (t.reshape(-1, N) for t in (gate, up))
    g2, u2 = (t if t.shape[0] == 0 or t.stride(1) == 1 else t.contiguous() for t in (g2, u2))
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        BLOCK = min(4096, triton.next_power_of_2(N))
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(N, BLOCK))](g2, u2, out, g2.shape[0], N, g2.stride(0), u2.stride(0),
                                                              out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out.view(gate.shape)
