"""One Qwen2.5-VL-7B vision block's steps at 128k visual tokens (524,288 patches), bf16: the stock transformers
code against what the integration runs instead. e2e's encoder profile found 1.8 of the encoder's 3.8 s in the MLP
GEMMs, which cuBLAS ran as Ampere kernels at ~35 % of peak (3420 x 2 bytes is not a multiple of 16), and 1.6 s in
chains of fp32 element-wise kernels (RMSNorm, rotary embedding).

- MLP: stock (gate, up, down over 3420) vs fused and padded (``integrations.fused``: one GEMM for gate/up over
  2 x 3456 rows, down over 3456 columns, zero padding, the SiLU gate as one kernel);
- SiLU gate: ``F.silu(gate) * up`` (two element-wise kernels) vs ``triton_kernels.vision.silu_mul``, on the halves
  of a fused gate/up output;
- RMSNorm: ``Qwen2_5_VLRMSNorm`` vs ``triton_kernels.vision.rms_norm``;
- add + RMSNorm: the residual add then ``rms_norm`` (what the integration ran before) vs ``add_rms_norm``;
- rotary: ``apply_rotary_pos_emb_vision`` on q, k views of the qkv output vs ``triton_kernels.vision.rotary_qk`` (one
  launch for q and k);
- window attention + rotary: ``rotary_qk`` then ``prefill_attention`` over 64-patch windows vs ``window_attention``
  (the rotary embedding inside), per heads-per-program and warp count, and with its defaults right after the block's
  qkv GEMM (as in the tower, where it ran 1.2x slower than here);
- attention over 64-patch windows (28 blocks) and over 1024-patch frames (4 blocks), non-causal, on q, k, v views
  of the qkv output: one batched SDPA (``integrations.attention.batched_sdpa``) vs one varlen ``prefill_attention``
  (its looked-up config: the shipped table's where tuned); the column ``varlen_attention`` names the route the
  integration takes for that segment length (``SDPA_MIN_SEGMENT``).

``python -m bench.vision_block [--patches N] [--only STEP]``. Per row: time per call, the step's share of an encoder
forward (x 32 blocks; x 2 for the norms), and the speedup of each replacement over stock; the bytes floor (inputs
read once, outputs written once, at the measured copy bandwidth) for the element-wise rows.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import copy_bandwidth_tbps, require_gpu, time_cuda, verify, write_results

HIDDEN, INTERMEDIATE, HEADS, BLOCKS = 1280, 3420, 16, 32  # Qwen2.5-VL-7B vision config
WINDOW, FRAME, FULL_BLOCKS = 64, 1024, 4  # patches per window and per frame (32 x 32), full-attention blocks
HEAD_DIM = HIDDEN // HEADS


def _row(step, variant, ms, per_encoder, floor_ms=None, **extra):
    row = {"step": step, "variant": variant, "median_ms": ms, "per_encoder_ms": per_encoder * ms, **extra}
    if floor_ms:
        row["floor_ms"], row["x_floor"] = floor_ms, ms / floor_ms
    return row


def _mlp(x, time):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
    from sparsevila_ops.integrations import fused
    T = x.shape[0]
    block = nn.Module()
    cfg = SimpleNamespace(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")
    block.mlp = hf.Qwen2_5_VLMLP(cfg, bias=True).to("cuda", torch.bfloat16)
    ref = block.mlp(x).float()
    flop = 3 * 2 * T * HIDDEN * INTERMEDIATE
    stock = time(lambda: block.mlp(x))
    rows = [_row("MLP", "stock (3 GEMMs, intermediate 3420)", stock, BLOCKS, TFLOP_s=flop / stock / 1e9)]
    assert fused.fuse([block]) == ["0.mlp"]
    verify("padded MLP", block.mlp(x).float(), ref, 1e-2)
    ours = time(lambda: block.mlp(x))
    rows.append(_row("MLP", "fused gate/up, padded to 3456", ours, BLOCKS, TFLOP_s=flop / ours / 1e9,
                     speedup=stock / ours))
    return rows


def _silu(T, bw, time):
    """The SiLU gate on the two halves of the fused (padded) gate/up output."""
    from sparsevila_ops.triton_kernels import vision
    gate, up = torch.randn(T, 2 * 3456, device="cuda", dtype=torch.bfloat16).chunk(2, dim=-1)
    floor = 3 * gate.numel() * 2 / bw * 1e3
    verify("silu_mul", vision.silu_mul(gate, up).float(), (F.silu(gate) * up).float(), 1e-2)
    stock = time(lambda: F.silu(gate) * up)
    ours = time(lambda: vision.silu_mul(gate, up))
    return [_row("SiLU gate", "F.silu(gate) * up (2 kernels)", stock, BLOCKS, floor),
            _row("SiLU gate", "triton_kernels.vision.silu_mul", ours, BLOCKS, floor, speedup=stock / ours)]


def _norm(x, bw, time):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
    from sparsevila_ops.triton_kernels import vision
    norm = hf.Qwen2_5_VLRMSNorm(HIDDEN).to("cuda", torch.bfloat16)
    floor = 2 * x.numel() * 2 / bw * 1e3
    verify("rms_norm", vision.rms_norm(x, norm.weight, norm.variance_epsilon).float(), norm(x).float(), 1e-2)
    stock = time(lambda: norm(x))
    ours = time(lambda: vision.rms_norm(x, norm.weight, norm.variance_epsilon))
    return [_row("RMSNorm", "Qwen2_5_VLRMSNorm (fp32 chain)", stock, 2 * BLOCKS, floor),
            _row("RMSNorm", "triton_kernels.vision.rms_norm", ours, 2 * BLOCKS, floor, speedup=stock / ours)]


def _add_norm(x, bw, time):
    """A residual add and the RMSNorm after it (each block's ``h + attn`` with ``norm2``, and ``h + mlp`` with the next
    block's ``norm1``): eager's add then ``rms_norm`` vs ``add_rms_norm``."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
    from sparsevila_ops.triton_kernels import vision
    norm = hf.Qwen2_5_VLRMSNorm(HIDDEN).to("cuda", torch.bfloat16)
    r = torch.randn_like(x)
    floor = 4 * x.numel() * 2 / bw * 1e3
    s, y = vision.add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
    verify("add_rms_norm sum", s.float(), (x + r).float(), 0)
    verify("add_rms_norm", y.float(), norm(x + r).float(), 1e-2)

    def apart():
        s = x + r
        return s, vision.rms_norm(s, norm.weight, norm.variance_epsilon)
    stock = time(apart)
    ours = time(lambda: vision.add_rms_norm(x, r, norm.weight, norm.variance_epsilon))
    return [_row("add + RMSNorm", "x + r, then triton_kernels.vision.rms_norm", stock, 2 * BLOCKS, floor),
            _row("add + RMSNorm", "triton_kernels.vision.add_rms_norm", ours, 2 * BLOCKS, floor, speedup=stock / ours)]


def _rotary(qkv, bw, time):
    """Rotary on q, k views of one qkv output."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
    from sparsevila_ops.triton_kernels import vision
    q, k = qkv[:, 0], qkv[:, 1]
    emb = torch.randn(q.shape[0], HEAD_DIM // 2, device="cuda").repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    floor = (2 * 2 * q.numel() * 2 + 2 * cos.numel() * 4) / bw * 1e3
    want = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    got = vision.rotary_qk(q, k, cos, sin)
    for g, w in zip(got, want):
        verify("rotary_qk", g.float(), w.float(), 1e-2)
    stock = time(lambda: hf.apply_rotary_pos_emb_vision(q, k, cos, sin))
    ours = time(lambda: vision.rotary_qk(q, k, cos, sin))
    return [_row("rotary q, k", "apply_rotary_pos_emb_vision (fp32 chain)", stock, BLOCKS, floor),
            _row("rotary q, k", "triton_kernels.vision.rotary_qk", ours, BLOCKS, floor, speedup=stock / ours)]


def _attention(qkv, time):
    """Non-causal attention within equal segments (windows, frames): the batched SDPA that ``varlen_attention``
    runs for them vs one varlen ``prefill_attention``."""
    from sparsevila_ops import prefill_attention
    from sparsevila_ops.integrations.attention import SDPA_MIN_SEGMENT, batched_sdpa
    q, k, v = qkv.unbind(1)
    T, scale, rows = q.shape[0], HEAD_DIM ** -0.5, []
    for n, blocks in ((WINDOW, BLOCKS - FULL_BLOCKS), (FRAME, FULL_BLOCKS)):
        cu = torch.arange(0, T + 1, n, device=q.device, dtype=torch.int32)
        flop = 4 * T * n * HEADS * HEAD_DIM
        want = batched_sdpa(q, k, v, n, scale)[0].float()
        got = prefill_attention(q, k, v, cu, cu, n, n, scale=scale, causal=False)[0]
        verify(f"prefill_attention, {n}-patch segments", got.float(), want, 1e-2)
        sdpa = time(lambda: batched_sdpa(q, k, v, n, scale)[0])
        ours = time(lambda: prefill_attention(q, k, v, cu, cu, n, n, scale=scale, causal=False))
        step, used = f"attention, {n}-patch segments", "batched SDPA" if n >= SDPA_MIN_SEGMENT else "prefill"
        rows += [_row(step, "batched SDPA", sdpa, blocks, TFLOP_s=flop / sdpa / 1e9, varlen_attention=used),
                 _row(step, "prefill_attention (one varlen launch)", ours, blocks, TFLOP_s=flop / ours / 1e9,
                      speedup=sdpa / ours, varlen_attention=used)]
    return rows


def window_inputs(T: int, D: int, device) -> tuple:
    """A window block's other inputs for ``T`` patches: fp32 ``cos, sin [T, D]`` of one random angle per pair of
    columns, and the int32 ``cu_seqlens`` of 64-patch windows (the last one shorter where ``T`` is not a multiple)."""
    emb = torch.randn(T, D // 2, device=device).repeat(1, 2)
    cu = torch.arange(0, T + 1, WINDOW, device=device, dtype=torch.int32)
    if cu[-1] != T:
        cu = torch.cat([cu, cu.new_tensor([T])])
    return emb.cos(), emb.sin(), cu


def _window(qkv, bw, time):
    """A window block's rotary embedding and attention over 64-patch windows: ``rotary_qk`` then one varlen
    ``prefill_attention`` (what the integration ran before) vs ``window_attention`` (both in one launch), for each
    heads-per-program and warp count; bytes floor: q, k, v and cos / sin read once, the output written once."""
    from sparsevila_ops import prefill_attention
    from sparsevila_ops.triton_kernels import vision
    T, scale = qkv.shape[0], HEAD_DIM ** -0.5
    cos, sin, cu = window_inputs(T, HEAD_DIM, qkv.device)
    floor = (4 * T * HEADS * HEAD_DIM * 2 + 2 * cos.numel() * 4) / bw * 1e3

    def before():
        q, k = vision.rotary_qk(qkv[:, 0], qkv[:, 1], cos, sin)
        return prefill_attention(q, k, qkv[:, 2], cu, cu, WINDOW, WINDOW, scale=scale, causal=False)[0]
    want = before().float()
    rows = [_row("window attention + rotary", "rotary_qk, then prefill_attention", time(before), BLOCKS - FULL_BLOCKS,
                 floor)]
    for hpp in (1, 2, 4, 8, 16):
        for warps in (4, 8):
            run = lambda: vision.window_attention(qkv, cos, sin, cu, WINDOW, scale, hpp, warps)  # noqa: E731
            verify(f"window_attention hpp={hpp} warps={warps}", run().float(), want, 1e-2)
            ms = time(run)
            rows.append(_row("window attention + rotary", f"window_attention, {hpp} heads / program, {warps} warps",
                             ms, BLOCKS - FULL_BLOCKS, floor, speedup=rows[0]["median_ms"] / ms))
    # In the tower the kernel took 3.4 ms per call against this bench's 2.69 (bench/NOTES.md): timed right after the
    # block's qkv GEMM, as it runs there (its share: the pair's time less the GEMM's), with the library's defaults.
    x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3 * HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5
    gemm = lambda: F.linear(x, w).view(T, 3, HEADS, HEAD_DIM)  # noqa: E731
    after_gemm = lambda: vision.window_attention(gemm(), cos, sin, cu, WINDOW, scale)  # noqa: E731
    out = gemm()
    q, k = vision.rotary_qk(out[:, 0], out[:, 1], cos, sin)
    verify("window_attention after the qkv GEMM", after_gemm().float(),
           prefill_attention(q, k, out[:, 2], cu, cu, WINDOW, WINDOW, scale=scale, causal=False)[0].float(), 1e-2)
    del out, q, k
    ms = time(after_gemm) - time(gemm)
    rows.append(_row("window attention + rotary", "window_attention (defaults) after the qkv GEMM: pair - GEMM", ms,
                     BLOCKS - FULL_BLOCKS, floor, speedup=rows[0]["median_ms"] / ms if ms > 0 else None))
    return rows


STEPS = {"mlp": _mlp, "silu": _silu, "norm": _norm, "add_norm": _add_norm, "rotary": _rotary, "attention": _attention,
         "window": _window}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=524288, help="rows of the block input (default: 128k tokens x 4)")
    p.add_argument("--only", action="append", choices=sorted(STEPS), help="only these steps (repeatable)")
    args = p.parse_args(argv)
    if not require_gpu("bench.vision_block"):
        return 0
    torch.manual_seed(0)
    T, bw = args.patches, copy_bandwidth_tbps() * 1e12
    time = lambda fn: time_cuda(lambda i: fn(), warmup=3, iters=10)["median_ms"]  # noqa: E731
    steps, rows = args.only or list(STEPS), []
    with torch.no_grad():
        x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(T, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        inputs = {"mlp": (x, time), "silu": (T, bw, time), "norm": (x, bw, time), "add_norm": (x, bw, time),
                  "rotary": (qkv, bw, time), "attention": (qkv, time), "window": (qkv, bw, time)}
        for step in steps:
            rows += STEPS[step](*inputs[step])
    write_results("vision_block", rows, ["step", "variant", "median_ms", "per_encoder_ms", "TFLOP_s", "floor_ms",
                                         "x_floor", "speedup"], title="Qwen2.5-VL-7B vision block steps, bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
