"""Probe: the rotary embedding with each token's cos / sin loaded once for all its heads, against
``triton_kernels.vision.rotary_qk`` (one unit of 8 elements per (token, head, column), so every head reloads its
token's cos / sin rows: 4x the bytes of x through L1 per unit when cos / sin are fp32). At 524,288 patches the
production kernel took 1.625 ms, 1.21x its byte floor (bench/NOTES.md, "The vision tower's residual adds in its
norms"); this asks whether those reloads are the missing 0.28 ms.

The variant's programs take ``BLOCK_U`` units of (token, column) and loop over the heads, each unit's cos / sin in
registers for all of them. Same arithmetic per element as the production kernel, so its outputs must equal the
production kernel's up to FMA contraction (where one kernel's build fused a product and a sum and the other's did
not; checked before timing, the count of differing elements reported). Shapes: Qwen2.5-VL-7B's vision blocks (q, k
views of a qkv output [T, 3, 16, 80] bf16, fp32 cos / sin) and its LLM prefill at 32k tokens (``rope_qk``: 28 q and
4 k heads, D 128, bf16 cos / sin, products rounded as eager's).

``python -m bench.rotary_probe [--patches N] [--tokens N]``: per shape and variant, ms, the bytes floor (x read and
written once, cos / sin read once) and ms / floor. A probe: nothing in the package uses the variant.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.common import copy_bandwidth_tbps, require_gpu, time_cuda, write_results

BLOCK_US = (64, 128, 256)  # units of (token, column) per program


@triton.jit
def _rotate_heads_block(x, cos, sin, out, b, T, stride_xt, stride_xh, stride_ct, stride_st, H: tl.constexpr,
                        D: tl.constexpr, VEC: tl.constexpr, BLOCK_U: tl.constexpr, EAGER_ROUND: tl.constexpr):
    """Block ``b`` of ``x`` [T, H, D]: BLOCK_U units of VEC columns of a first half (and the VEC columns HALF
    further), each unit's cos / sin loaded once and applied to all H heads."""
    HALF: tl.constexpr = D // 2
    NV: tl.constexpr = HALF // VEC  # units per token
    first = b.to(tl.int64) * BLOCK_U
    t0 = first // NV
    u = (first - t0 * NV).to(tl.int32) + tl.arange(0, BLOCK_U)
    t = u // NV
    e = (u % NV) * VEC
    m = ((t0 + t) < T)[:, None]
    vec = tl.arange(0, VEC)[None, :]
    c = cos + t0 * stride_ct + (t * stride_ct + e)[:, None] + vec
    s = sin + t0 * stride_st + (t * stride_st + e)[:, None] + vec
    c1 = tl.load(c, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=m, other=0.0).to(tl.float32)
    src = x + t0 * stride_xt + (t * stride_xt + e)[:, None] + vec
    dst = out + t0 * (H * D) + (t * (H * D) + e)[:, None] + vec
    for h in tl.static_range(H):
        x1 = tl.load(src + h * stride_xh, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + h * stride_xh + HALF, mask=m, other=0.0).to(tl.float32)
        a1, b1 = x1 * c1, (-x2) * s1
        a2, b2 = x2 * c2, x1 * s2
        if EAGER_ROUND:
            ty = out.dtype.element_ty
            a1, b1, a2, b2 = a1.to(ty).to(tl.float32), b1.to(ty).to(tl.float32), a2.to(ty).to(tl.float32), \
                b2.to(ty).to(tl.float32)
        tl.store(dst + h * D, (a1 + b1).to(out.dtype.element_ty), mask=m)
        tl.store(dst + h * D + HALF, (a2 + b2).to(out.dtype.element_ty), mask=m)


@triton.jit
def _rotary_heads_kernel(q, k, cos, sin, oq, ok, T, nb, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                         stride_st, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, VEC: tl.constexpr,
                         BLOCK_U: tl.constexpr, EAGER_ROUND: tl.constexpr):
    """q's and k's ``nb`` blocks each, alternating: a q block and the k block of the same tokens are neighbours."""
    pid = tl.program_id(0)
    if pid % 2 == 0:
        _rotate_heads_block(q, cos, sin, oq, pid // 2, T, stride_qt, stride_qh, stride_ct, stride_st, HQ, D, VEC,
                            BLOCK_U, EAGER_ROUND)
    else:
        _rotate_heads_block(k, cos, sin, ok, pid // 2, T, stride_kt, stride_kh, stride_ct, stride_st, HK, D, VEC,
                            BLOCK_U, EAGER_ROUND)


def rotary_heads(q, k, cos, sin, block_u=128, eager_round=False, num_warps=4):
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous), cos, sin [T, D] (rows contiguous) -> contiguous rotated
    copies, as ``triton_kernels.vision._rotary``."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    oq = torch.empty(T, HQ, D, dtype=q.dtype, device=q.device)
    ok = torch.empty(T, HK, D, dtype=k.dtype, device=k.device)
    half = D // 2
    vec = min(half & -half, 16 // q.element_size())
    nb = triton.cdiv(T * (half // vec), block_u)
    if nb:
        _rotary_heads_kernel[(2 * nb,)](q, k, cos, sin, oq, ok, T, nb, q.stride(0), q.stride(1), k.stride(0),
                                        k.stride(1), cos.stride(0), sin.stride(0), HQ=HQ, HK=HK, D=D, VEC=vec,
                                        BLOCK_U=block_u, EAGER_ROUND=eager_round, num_warps=num_warps,
                                        enable_fp_fusion=not eager_round)
    return oq, ok


def shapes(patches: int, tokens: int, device="cuda"):
    """(name, q, k, cos, sin, eager_round): the vision blocks' and the LLM prefill's rotary inputs."""
    qkv = torch.randn(patches, 3, 16, 80, device=device, dtype=torch.bfloat16)
    emb = torch.randn(patches, 40, device=device).repeat(1, 2)
    proj = torch.randn(tokens, (28 + 2 * 4) * 128, device=device, dtype=torch.bfloat16)  # fused q/k/v output
    q, k = proj[:, :28 * 128].view(tokens, 28, 128), proj[:, 28 * 128:32 * 128].view(tokens, 4, 128)
    pos = torch.randn(tokens, 64, device=device).repeat(1, 2)
    return [("vision 16 x 80, fp32 cos / sin", qkv[:, 0], qkv[:, 1], emb.cos(), emb.sin(), False),
            ("LLM prefill 28 / 4 x 128, bf16 cos / sin", q, k, pos.cos().bfloat16(), pos.sin().bfloat16(), True)]


def check(q, k, cos, sin, eager_round, block_u):
    """The variant's outputs against the production kernel's: equal, or as far apart as contracting a product and a
    sum into one FMA in one kernel's build and not the other's can make them (one ulp of the output, plus fp32
    rounding of the two products: where they cancel, that is many output ulps). Returns the count of elements that
    differ; raises on any larger difference."""
    from sparsevila_ops.triton_kernels.vision import _rotary
    want, got = _rotary(q, k, cos, sin, eager_round=eager_round), rotary_heads(q, k, cos, sin, block_u, eager_round)
    cs = max(cos.abs().max().item(), sin.abs().max().item())
    differ = 0
    for name, x, w, g in zip("qk", (q, k), want, got):
        ne = w != g
        differ += int(ne.sum())
        if ne.any():
            wf, gf = w[ne].float(), g[ne].float()
            tol = (torch.maximum(wf.abs(), gf.abs()) * torch.finfo(w.dtype).eps  # one ulp (up to 2x over)
                   + 4 * torch.finfo(torch.float32).eps * 2 * x.abs().max().float() * cs)
            over = int(((wf - gf).abs() > tol).sum())
            if over:
                raise AssertionError(f"rotary_heads (BLOCK_U {block_u}): {name} differs from rotary_qk's by more "
                                     f"than FMA contraction can at {over} of {w.numel()} elements: refusing to "
                                     "time it")
    return differ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=524288, help="vision tokens (default: 128k visual tokens)")
    p.add_argument("--tokens", type=int, default=32768, help="LLM prefill tokens")
    a = p.parse_args(argv)
    if not require_gpu("bench.rotary_probe"):
        return 0
    from sparsevila_ops.triton_kernels.vision import _rotary
    bw = copy_bandwidth_tbps() * 1e12
    rows = []
    for name, q, k, cos, sin, eager in shapes(a.patches, a.tokens):
        floor = (2 * (q[..., 0].numel() + k[..., 0].numel()) * q.shape[-1] * q.element_size()
                 + 2 * cos.numel() * cos.element_size()) / bw * 1e3
        base = time_cuda(lambda _: _rotary(q, k, cos, sin, eager_round=eager))["median_ms"]
        rows.append({"shape": name, "variant": "rotary_qk (production)", "median_ms": base, "floor_ms": floor,
                     "x_floor": base / floor})
        for block_u in BLOCK_US:
            differ = check(q, k, cos, sin, eager, block_u)
            for warps in (4, 8):
                ms = time_cuda(lambda _: rotary_heads(q, k, cos, sin, block_u, eager, warps))["median_ms"]
                rows.append({"shape": name, "variant": f"heads loop, BLOCK_U {block_u}, {warps} warps",
                             "median_ms": ms, "floor_ms": floor, "x_floor": ms / floor, "speedup": base / ms,
                             "elements_that_differ": differ})
    write_results("rotary_probe", rows, ["shape", "variant", "median_ms", "floor_ms", "x_floor", "speedup",
                                             "elements_that_differ"],
                  title=f"rotary: cos / sin once per token vs per head ({a.patches} patches, {a.tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
