"""Triton kernels for the element-wise steps of a vision encoder block that eager PyTorch runs as chains of fp32
kernels: RMSNorm, LayerNorm (each alone or with the residual add before it), the vision rotary embedding and the
MLP's SiLU gate (Qwen2.5-VL's ``Qwen2_5_VLRMSNorm``, SigLIP's ``nn.LayerNorm``, ``apply_rotary_pos_emb_vision`` and
``act_fn(gate) * up``), and of a decoder's prefill (its RMSNorms, and ``apply_rotary_pos_emb``'s chain of
half-precision kernels). Each reads its inputs once and writes its outputs once, with the same math:

    rms_norm:   y = w * bf(x / sqrt(mean(x^2) + eps))       (x in fp32; bf(): back to x's dtype, as the module does)
    add_rms_norm: s = bf(x + r), y = rms_norm(s)              (a residual add and the next block's norm, one pass)
    layer_norm: y = bf((x - mean(x)) / sqrt(var(x) + eps) * w + b)   (fp32 inside, biased variance, as F.layer_norm)
    add_layer_norm: s = bf(x + r), y = layer_norm(s)
    rotary_qk:  o = x * cos + rotate_half(x) * sin, for x in (q, k)   (fp32; rotate_half(x) = [-x2, x1]; o in x's dtype)
    rope_qk:    the same for a decoder's q, k [B, H, L, D] in fp16 / bf16, each product and the sum rounded to it
    silu_mul:   h = bf(bf(g / (1 + exp(-g))) * u)             (fp32 inside, rounded as eager's two kernels round)
    window_attention: o = softmax(scale rot(q) rot(k)^T) v within each window of <= 64 tokens, rot as rotary_qk's

On the H200 at 128k visual tokens (524,288 patches of 1280 features) eager PyTorch spent 1.6 of the encoder's 3.8 s
in element-wise kernels (e2e's encoder profile; bench/NOTES.md). Used by the integration on CUDA tensors.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .._device import on_tensor_device
from .prefill import LOG2E, _split_d


@triton.jit
def _add_residual(v, r, sum_out, rows, cols, mask, stride_r, stride_s):
    """The residual stream's ``x + r`` (``v`` holds x in fp32), rounded to its dtype as eager's add rounds and
    stored to ``sum_out``; returns the rounded sum in fp32, which the norm then normalizes."""
    v += tl.load(r + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    v = v.to(sum_out.dtype.element_ty)
    tl.store(sum_out + rows[:, None].to(tl.int64) * stride_s + cols[None, :], v, mask=mask)
    return v.to(tl.float32)


@triton.jit
def _rms_norm_kernel(x, r, w, sum_out, out, n_rows, stride_x, stride_r, stride_s, stride_o, eps, N: tl.constexpr,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(x + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        v = _add_residual(v, r, sum_out, rows, cols, mask, stride_r, stride_s)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, 1) / N + eps)
    y = (v * inv[:, None]).to(x.dtype.element_ty).to(tl.float32)
    wv = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], (wv[None, :] * y).to(out.dtype.element_ty),
             mask=mask)


def _check_residual(x: torch.Tensor, r: torch.Tensor) -> None:
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"x and r must have one shape and dtype; got {tuple(x.shape)} {x.dtype}, "
                         f"{tuple(r.shape)} {r.dtype}")


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (the last dim of x); got {tuple(weight.shape)}")


@on_tensor_device
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape, last dim contiguous); the result has the dtype of
    ``weight * x`` (PyTorch's promotion), as the module's."""
    _check_norm_weight(x, weight)
    x2, BLOCK, ROWS = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, x2, weight, out, out, x2.shape[0], x2.stride(0), 0, 0,
                                                            out.stride(0), float(eps), N=x2.shape[1], BLOCK=BLOCK,
                                                            ROWS=ROWS, ADD=False, num_warps=4)
    return out.view(x.shape)


@on_tensor_device
def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the next RMSNorm in one pass: ``s = x + r`` (in their dtype, as eager's add) and
    ``rms_norm(s, weight, eps)``; x, r of one shape and dtype (any leading shape, last dim contiguous). Returns
    new contiguous ``(s, rms_norm(s))``: reads x and r once and writes both (4 row passes; the add and the norm
    apart take 5)."""
    _check_residual(x, r)
    _check_norm_weight(x, weight)
    x2, BLOCK, ROWS = _rows(x)
    r2 = _rows(r)[0]
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, r2, weight, s, out, x2.shape[0], x2.stride(0),
                                                            r2.stride(0), s.stride(0), out.stride(0), float(eps),
                                                            N=x2.shape[1], BLOCK=BLOCK, ROWS=ROWS, ADD=True,
                                                            num_warps=4)
    return s.view(x.shape), out.view(x.shape)


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
def _layer_norm_kernel(x, r, w, b, sum_out, out, n_rows, stride_x, stride_r, stride_s, stride_o, eps,
                       N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    v = tl.load(x + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        v = _add_residual(v, r, sum_out, rows, cols, mask, stride_r, stride_s)
    d = tl.where(mask, v - (tl.sum(v, 1) / N)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
    wv = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    bv = tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * wv[None, :] + bv[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


def _check_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (N,) or t.dtype != x.dtype:
            raise ValueError(f"{name} must have shape ({N},) (the last dim of x) and x's dtype {x.dtype}; got "
                             f"{tuple(t.shape)} {t.dtype}")


@on_tensor_device
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (N,), weight, bias, eps)`` over the last dim of ``x`` (any leading shape, last dim
    contiguous), with ``weight``, ``bias`` ``[N]`` in x's dtype; the result is in x's dtype."""
    _check_affine(x, weight, bias)
    x2, BLOCK, ROWS = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _layer_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, x2, weight, bias, out, out, x2.shape[0],
                                                              x2.stride(0), 0, 0, out.stride(0), float(eps),
                                                              N=x2.shape[1], BLOCK=BLOCK, ROWS=ROWS, ADD=False,
                                                              num_warps=4)
    return out.view(x.shape)


@on_tensor_device
def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm`` for LayerNorm: ``s = x + r`` and ``layer_norm(s, weight, bias, eps)`` in one pass; new
    contiguous ``(s, layer_norm(s))``."""
    _check_residual(x, r)
    _check_affine(x, weight, bias)
    x2, BLOCK, ROWS = _rows(x)
    r2 = _rows(r)[0]
    s, out = torch.empty(x2.shape, dtype=x.dtype, device=x.device), torch.empty(x2.shape, dtype=x.dtype,
                                                                                device=x.device)
    if x2.shape[0]:
        _layer_norm_kernel[(triton.cdiv(x2.shape[0], ROWS),)](x2, r2, weight, bias, s, out, x2.shape[0],
                                                              x2.stride(0), r2.stride(0), s.stride(0),
                                                              out.stride(0), float(eps), N=x2.shape[1],
                                                              BLOCK=BLOCK, ROWS=ROWS, ADD=True, num_warps=4)
    return s.view(x.shape), out.view(x.shape)


@triton.jit
def _rotate_block(x, cos, sin, out, b, T, stride_xt, stride_xh, stride_ct, stride_st,
                  H: tl.constexpr, D: tl.constexpr, VEC: tl.constexpr, BLOCK_U: tl.constexpr,
                  EAGER_ROUND: tl.constexpr):
    """Block ``b`` of ``x`` [T, H, D]'s rotation, in units of VEC elements of a first half and the VEC elements
    HALF further (a token has H * HALF / VEC units); ``out`` is a contiguous [T, H, D]."""
    HALF: tl.constexpr = D // 2
    NV: tl.constexpr = HALF // VEC  # units per head
    UPT: tl.constexpr = H * NV  # units per token
    first = b.to(tl.int64) * BLOCK_U
    t0 = first // UPT  # the block's first token; below, tokens and offsets relative to it fit in int32
    u = (first - t0 * UPT).to(tl.int32) + tl.arange(0, BLOCK_U)
    t = u // UPT
    h = (u % UPT) // NV
    e = (u % NV) * VEC  # a unit's first column within its half
    m = ((t0 + t) < T)[:, None]
    vec = tl.arange(0, VEC)[None, :]
    src = x + t0 * stride_xt + (t * stride_xt + h * stride_xh + e)[:, None] + vec
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    c = cos + t0 * stride_ct + (t * stride_ct + e)[:, None] + vec
    s = sin + t0 * stride_st + (t * stride_st + e)[:, None] + vec
    c1 = tl.load(c, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=m, other=0.0).to(tl.float32)
    a1, b1 = x1 * c1, (-x2) * s1
    a2, b2 = x2 * c2, x1 * s2
    if EAGER_ROUND:  # each product rounded to x's dtype, as eager's half-precision multiplies round (no FMA)
        ty = out.dtype.element_ty
        a1, b1, a2, b2 = a1.to(ty).to(tl.float32), b1.to(ty).to(tl.float32), a2.to(ty).to(tl.float32), \
            b2.to(ty).to(tl.float32)
    dst = out + t0 * (H * D) + (t * (H * D) + h * D + e)[:, None] + vec
    tl.store(dst, (a1 + b1).to(out.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (a2 + b2).to(out.dtype.element_ty), mask=m)


@triton.jit
def _rotary_qk_kernel(q, k, cos, sin, oq, ok, T, nq, nk, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                      stride_st, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, VEC: tl.constexpr,
                      BLOCK_U: tl.constexpr, EAGER_ROUND: tl.constexpr):
    """q's ``nq`` blocks and k's ``nk`` in one grid, alternating while both have blocks (with HQ == HK, a q block
    and the k block beside it rotate the same tokens: their cos / sin rows are read from DRAM once)."""
    pid = tl.program_id(0)
    both = tl.minimum(nq, nk)
    alternate = pid < 2 * both
    is_q = tl.where(alternate, pid % 2 == 0, nq > nk)
    b = tl.where(alternate, pid // 2, pid - both)
    if is_q:
        _rotate_block(q, cos, sin, oq, b, T, stride_qt, stride_qh, stride_ct, stride_st, HQ, D, VEC, BLOCK_U,
                      EAGER_ROUND)
    else:
        _rotate_block(k, cos, sin, ok, b, T, stride_kt, stride_kh, stride_ct, stride_st, HK, D, VEC, BLOCK_U,
                      EAGER_ROUND)


def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eager_round: bool = False
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous), cos, sin [T, D] (rows contiguous) -> contiguous rotated
    copies, in one launch."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    oq = torch.empty(T, HQ, D, dtype=q.dtype, device=q.device)
    ok = torch.empty(T, HK, D, dtype=k.dtype, device=k.device)
    half = D // 2
    vec = min(half & -half, 16 // q.element_size())  # the widest power of two that divides a half, <= 16 bytes
    BLOCK_U = max(16, 2048 // vec)  # units per program: 4096 elements of q or k
    nq, nk = (triton.cdiv(T * h * (half // vec), BLOCK_U) for h in (HQ, HK))
    if nq + nk:
        _rotary_qk_kernel[(nq + nk,)](q, k, cos, sin, oq, ok, T, nq, nk, q.stride(0), q.stride(1), k.stride(0),
                                      k.stride(1), cos.stride(0), sin.stride(0), HQ=HQ, HK=HK, D=D, VEC=vec,
                                      BLOCK_U=BLOCK_U, EAGER_ROUND=eager_round, num_warps=4,
                                      enable_fp_fusion=not eager_round)  # fused, a product and its sum round once
    return oq, ok


@on_tensor_device
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
    return _rotary(q, k, cos, sin)


@on_tensor_device
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
    rows = []
    for x in (q, k):
        r = x.transpose(1, 2).reshape(B * L, x.shape[1], D)  # a view for a projection's output
        rows.append(r if r.shape[0] == 0 or r.stride(-1) == 1 else r.contiguous())
    oq, ok = _rotary(rows[0], rows[1], c, s, eager_round=True)
    return oq.view(B, L, q.shape[1], D).transpose(1, 2), ok.view(B, L, k.shape[1], D).transpose(1, 2)


@triton.jit
def _silu_mul_kernel(gate, up, out, n_rows, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * stride_o + cols, (act * u).to(out.dtype.element_ty), mask=mask)


@on_tensor_device
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


@triton.jit
def _rope_tile(base, cos, sin, cols, mask, HALF: tl.constexpr):
    """Rows of one head's q or k (``base``: a [rows, 1] pointer column) at ``cols``, rotated as ``rotary_qk``
    rotates them (fp32, rounded to x's dtype): ``x[c] cos[c] -/+ x[c +/- HALF] sin[c]``; cos, sin are fp32 tiles."""
    partner = tl.where(cols < HALF, cols + HALF, cols - HALF)
    x = tl.load(base + cols[None, :], mask=mask, other=0.0)
    xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    rot = tl.where((cols < HALF)[None, :], -xp, xp)
    return (x.to(tl.float32) * cos + rot * sin).to(x.dtype)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _window_attention_kernel(QKV, Cos, Sin, Out, cu, stride_t, stride_3, stride_h, stride_ct, stride_st, stride_ot,
                             stride_oh, qk_scale, H: tl.constexpr, HPP: tl.constexpr, D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                             IEEE: tl.constexpr):
    """One program = one window and HPP heads: rotate q and k (the window's cos / sin tiles loaded once for its
    heads), S = q k^T over the window (one tile: no online softmax), out = softmax(S) v. The head dim runs as
    columns [0, BLOCK_D) and, where BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2) (``prefill._split_d``)."""
    HALF: tl.constexpr = D // 2
    NHB: tl.constexpr = (H + HPP - 1) // HPP
    pid = tl.program_id(0)
    w = pid // NHB
    h0 = (pid % NHB) * HPP
    start = tl.load(cu + w)
    n = tl.load(cu + w + 1) - start
    if n <= 0:
        return
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tok = (start + rows).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_D)
    m1 = row_ok[:, None] & (cols < D)[None, :]
    c1 = tl.load(Cos + tok * stride_ct + cols[None, :], mask=m1, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + tok * stride_st + cols[None, :], mask=m1, other=0.0).to(tl.float32)
    if BLOCK_D2 > 0:
        cols2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        m2 = row_ok[:, None] & (cols2 < D)[None, :]
        c2 = tl.load(Cos + tok * stride_ct + cols2[None, :], mask=m2, other=0.0).to(tl.float32)
        s2 = tl.load(Sin + tok * stride_st + cols2[None, :], mask=m2, other=0.0).to(tl.float32)
    for h in range(h0, tl.minimum(h0 + HPP, H)):
        q_base = QKV + tok * stride_t + h * stride_h
        k_base = q_base + stride_3
        v_base = k_base + stride_3
        o_base = Out + tok * stride_ot + h * stride_oh
        q = _rope_tile(q_base, c1, s1, cols, m1, HALF)
        k = _rope_tile(k_base, c1, s1, cols, m1, HALF)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_M], tl.float32), IEEE)
        if BLOCK_D2 > 0:
            q2 = _rope_tile(q_base, c2, s2, cols2, m2, HALF)
            k2 = _rope_tile(k_base, c2, s2, cols2, m2, HALF)
            s = _dot(q2, tl.trans(k2), s, IEEE)
        s = tl.where(row_ok[None, :], s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - tl.max(s, 1)[:, None])
        inv = 1.0 / tl.sum(p, 1)
        v = tl.load(v_base + cols[None, :], mask=m1, other=0.0)
        o = _dot(p.to(v.dtype), v, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), IEEE)
        tl.store(o_base + cols[None, :], (o * inv[:, None]).to(Out.dtype.element_ty), mask=m1)
        if BLOCK_D2 > 0:
            v2 = tl.load(v_base + cols2[None, :], mask=m2, other=0.0)
            o2 = _dot(p.to(v2.dtype), v2, tl.zeros([BLOCK_M, BLOCK_D2], tl.float32), IEEE)
            tl.store(o_base + cols2[None, :], (o2 * inv[:, None]).to(Out.dtype.element_ty), mask=m2)


WINDOW_MAX = 64  # window_attention's longest segment: one 64-row tile per window and head


@on_tensor_device
def window_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, heads_per_program: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Qwen2.5-VL's window attention with its rotary embedding, one launch: per segment ``s`` of ``cu_seqlens``
    (at most ``WINDOW_MAX`` tokens) and head, ``out = softmax(scale * rot(q) rot(k)^T) v`` over the segment's tokens
    (non-causal), where ``rot`` is ``rotary_qk``'s rotation. ``qkv [T, 3, H, D]`` is the qkv projection's output
    (any strides, last dim contiguous: q, k, v are read where they lie), ``cos, sin [T, D]`` (fp32, as the tower
    computes them); returns a new contiguous ``[T, H, D]``. Against ``rotary_qk`` then ``prefill_attention`` it
    skips writing and re-reading the rotated q and k, and loads each window's cos / sin once for
    ``heads_per_program`` heads."""
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [T, 3, H, D] with a contiguous last dim; got {tuple(qkv.shape)} strides "
                         f"{qkv.stride()}")
    T, _, H, D = qkv.shape
    if D % 2 or cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(f"cos, sin must be [T, D] = [{T}, {D}] with D even; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    cos, sin = (t if t.shape[0] == 0 or t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if not 0 <= max_seqlen <= WINDOW_MAX:
        raise ValueError(f"max_seqlen must be in [0, {WINDOW_MAX}] (one tile per window); got {max_seqlen}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens must be a contiguous 1-D int32 tensor; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if heads_per_program < 1:
        raise ValueError(f"heads_per_program must be >= 1; got {heads_per_program}")
    out = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device)
    windows = cu_seqlens.shape[0] - 1
    if windows > 0 and H and max_seqlen:
        block_d, block_d2 = _split_d(D)
        _window_attention_kernel[(windows * triton.cdiv(H, heads_per_program),)](
            qkv, cos, sin, out, cu_seqlens, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0),
            sin.stride(0), out.stride(0), out.stride(1), scale * LOG2E, H=H, HPP=heads_per_program, D=D,
            BLOCK_M=max(16, triton.next_power_of_2(max_seqlen)), BLOCK_D=block_d, BLOCK_D2=block_d2,
            IEEE=qkv.dtype == torch.float32, num_warps=num_warps,
            num_stages=1 if qkv.dtype == torch.float32 else 3)  # fp32 tiles: 3 stages overflow shared memory
    return out
