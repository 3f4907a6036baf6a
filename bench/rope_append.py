"""A decode step's rotary embedding and KV append: inductor's rope kernels + ``append_kv`` vs ``rope_append_kv``.

``python -m bench.rope_append [--iters 50]``. Qwen2.5-7B's decoder (Hq 28, Hk 4, D 128, bf16) at batch 1 and 8,
per layer inside one CUDA graph of 28 layers (each its own q, k, v, cos / sin and caches, as a decode step runs
them):

- ``unfused``: ``q * cos + rotate_half(q) * sin`` and the same of k under ``torch.compile`` (inductor emits them
  as its own kernels, as in the integration's compiled decode step before ``rope_append_kv``), then ``append_kv``;
- ``fused``: ``rope_append_kv``, one launch.

Both are checked against the reference first (rotated q and appended k within bf16 rounding). The bytes are a
few KB per layer, so the times are launch and dependency latency; ``launches`` counts the kernels per layer
(``torch.profiler``). Writes ``rope_append.{json,md}``.
"""
from __future__ import annotations

import argparse

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

import sparsevila_ops as so
from bench.common import require_gpu, time_cuda, verify, write_results
from sparsevila_ops import reference

LAYERS, HQ, HK, D, CAP = 28, 28, 4, 128, 4096
_rope_qk = torch.compile(apply_rotary_pos_emb, fullgraph=True)  # the model's own rope, as the compiled step ran it


def _layers(B: int, gen: torch.Generator) -> list:
    out = []
    for _ in range(LAYERS):
        qkv = torch.randn(B, HQ + 2 * HK, D, device="cuda", generator=gen).to(torch.bfloat16)
        angles = 6.283 * torch.rand(B, D, device="cuda", generator=gen)
        cache = [torch.zeros(B, HK, CAP, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        out.append({"q": qkv[:, :HQ], "k": qkv[:, HQ:HQ + HK], "v": qkv[:, HQ + HK:],
                    "cos": angles.cos().to(torch.bfloat16), "sin": angles.sin().to(torch.bfloat16),
                    "kc": cache[0], "vc": cache[1], "n": torch.full((B,), CAP // 2, dtype=torch.int32, device="cuda"),
                    "out": torch.empty(B, HQ, D, device="cuda", dtype=torch.bfloat16)})
    return out


def _unfused(t: dict) -> None:
    q, k = _rope_qk(t["q"], t["k"], t["cos"], t["sin"])  # cos, sin [B, D] -> [B, 1, D] over the heads
    t["out"].copy_(q)
    so.append_kv(k, t["v"], t["kc"], t["vc"], t["n"])


def _fused(t: dict) -> None:
    so.rope_append_kv(t["q"], t["k"], t["v"], t["cos"], t["sin"], t["kc"], t["vc"], t["n"], out=t["out"])


def _check(step, t: dict, name: str) -> None:
    """One call on a copy of ``t`` against the reference: rotated q, the appended k and v."""
    c = {key: val.clone() for key, val in t.items()}
    r = {key: val.clone() for key, val in t.items()}
    step(c)
    reference.rope_append_kv(r["q"], r["k"], r["v"], r["cos"], r["sin"], r["kc"], r["vc"], r["n"], r["out"])
    verify(f"{name} q", c["out"].float(), r["out"].float(), 2 ** -7)
    verify(f"{name} k", c["kc"].float(), r["kc"].float(), 2 ** -7)
    verify(f"{name} v", c["vc"].float(), r["vc"].float(), 0.0)


def _launches(step, layers: list) -> float:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in layers:
            step(t)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / len(layers)


def run(B: int, iters: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(B)
    layers = _layers(B, gen)
    row = {"B": B, "Hq": HQ, "Hk": HK, "D": D}
    for name, step in (("unfused", _unfused), ("fused", _fused)):
        _check(step, layers[0], name)
        row[f"{name}_launches"] = _launches(step, layers)

        def all_layers(_, step=step):
            for t in layers:
                step(t)
        row[f"{name}_us"] = 1e3 * time_cuda(all_layers, iters=iters, graph=True)["median_ms"] / LAYERS
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    row["step_saving_ms"] = (row["unfused_us"] - row["fused_us"]) * LAYERS / 1e3
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rope_append", description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    if not require_gpu("bench.rope_append"):
        return 0
    rows = [run(B, a.iters) for B in (1, 8)]
    write_results("rope_append", rows, ["B", "Hq", "Hk", "D", "unfused_us", "fused_us", "speedup", "unfused_launches",
                                        "fused_launches", "step_saving_ms"],
                  title=f"RoPE + KV append per decoder layer in a CUDA graph of {LAYERS} layers, bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
