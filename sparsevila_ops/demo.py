"""The whole SparseVILA pipeline on synthetic inputs shaped like a short video.

``python -m sparsevila_ops demo [--device cuda|cpu] [--size small|full] [--prefill-sparsity S] [--decode-sparsity S]``

1. salience over the vision encoder's tokens (one full-attention block, Qwen2.5-VL shapes: 16 heads x 80);
2. query-agnostic pruning before the LLM (2x2 merge groups, keep ``1 - prefill_sparsity``);
3. LLM prefill over [prefix | kept visual | question] with relevance for the question rows, every layer;
4. per-layer top-k of the visual KV entries (keep ``1 - decode_sparsity``) + gather-pack of all layers;
5. decode steps over the packed cache (``append_kv`` + ``decode_attention``), compared with attention over the
   full cache: the attention-mass recall is the share of each full-attention step's probability mass that
   falls on tokens the packed cache kept. The decode time is one token's ``decode_attention`` over every
   layer, captured in a CUDA graph and replayed as a serving decode loop runs it (on the CPU: the eager
   reference's wall clock).

Inputs are random with planted structure (a few salient patches; question- and decode-queries aligned with a
few visual keys per layer), as a stand-in for a real model's activations: the kernels and data flow are the
real ones, the weights are not. On CUDA the default backend is Triton; on the CPU the torch reference runs at
a reduced size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

import sparsevila_ops as so
from sparsevila_ops import _backend
from sparsevila_ops import _checks as C

SIZES = {
    # frames (temporal patch 2), patch grid per frame, LLM layers / heads, prefix and question tokens, steps
    "small": dict(frames=8, grid=16, layers=4, hq=28, hk=4, d=128, prefix=32, question=24, steps=8),
    "full": dict(frames=72, grid=32, layers=28, hq=28, hk=4, d=128, prefix=64, question=64, steps=32),
}
VIS_HEADS, VIS_D = 16, 80


def _unit(*shape, gen, device):
    w = torch.randn(*shape, generator=gen)
    return (w / w.norm(dim=-1, keepdim=True)).to(device)


@contextmanager
def _timed(times: Dict[str, float], name: str, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    times[name] = times.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def time_decode_step(step: Callable[[], object], device: torch.device, replays: int = 20) -> float:
    """Milliseconds per call of ``step`` (one token's decode over every layer). On CUDA the step is captured in
    one CUDA graph and the graph replayed ``replays`` times between CUDA events (the median), so the number is GPU
    time without per-launch host latency (how bench/decode.py times decode). On the CPU: eager wall clock."""
    if device.type != "cuda":
        step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        return (time.perf_counter() - t0) * 1e3 / 3
    from .autotune.tuner import cuda_timer

    return cuda_timer(lambda _: step(), 1, iters=replays)


def run(device: torch.device, size: str, prefill_sparsity: float, decode_sparsity: float, seed: int,
        dtype: torch.dtype) -> Dict[str, object]:
    cfg = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    times: Dict[str, float] = {}
    L, Hq, Hk, D = cfg["layers"], cfg["hq"], cfg["hk"], cfg["d"]
    G = Hq // Hk

    # 1. Vision encoder salience (one segment: the whole video in a full-attention block).
    t_groups = cfg["frames"] // 2
    n_patch = t_groups * cfg["grid"] ** 2
    salient = torch.randperm(n_patch // 4, generator=gen)[: max(1, n_patch // 4 // 20)]  # 5 % of merge groups
    u = _unit(VIS_HEADS, VIS_D, gen=gen, device=device)
    qv, kv_ = rnd(n_patch, VIS_HEADS, VIS_D), rnd(n_patch, VIS_HEADS, VIS_D)
    qv += 2.0 * u
    kv_.view(n_patch // 4, 4, VIS_HEADS, VIS_D)[salient.to(device)] += 3.0 * u
    qv, kv_ = qv.to(dtype), kv_.to(dtype)
    cu = torch.tensor([0, n_patch], dtype=torch.int32, device=device)
    with _timed(times, "1 vision salience", device):
        sal = so.visual_salience(qv, kv_, cu, n_patch)

    # 2. Query-agnostic pruning before the LLM (2x2 merge groups).
    with _timed(times, "2 prune visual tokens", device):
        kept_vis = so.prune_visual_tokens(sal, [n_patch], 1.0 - prefill_sparsity, group=4)
    n_vis = kept_vis.numel()
    planted_kept = torch.isin(salient.to(device), kept_vis).float().mean().item()

    # 3. LLM prefill with relevance for the question rows (tokens after the last visual token), per layer.
    P, Q = cfg["prefix"], cfg["question"]
    N = P + n_vis + Q
    vs, ve = P, P + n_vis
    n_rel = max(1, n_vis // 30)  # visual keys each layer's question is about
    w = _unit(L, Hk, D, gen=gen, device=device)
    rel_pos = [P + torch.randperm(n_vis, generator=gen)[:n_rel].to(device) for _ in range(L)]
    cu_n = torch.tensor([0, N], dtype=torch.int32, device=device)
    rel_rows = torch.tensor([[N - Q, N]], dtype=torch.int32, device=device)
    relevance = torch.empty(L, 1, Hk, N, dtype=torch.float32, device=device)
    k_full, v_full = [], []
    steps = cfg["steps"]
    for layer in range(L):
        q, k, v = rnd(N, Hq, D), rnd(N, Hk, D), rnd(N, Hk, D)
        q[N - Q:] += 8.0 * w[layer].repeat_interleave(G, 0)
        k[rel_pos[layer]] += 8.0 * w[layer]
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        with _timed(times, "3 LLM prefill + relevance", device):
            so.prefill_attention(q, k, v, cu_n, cu_n, N, N, causal=True, rel_rows=rel_rows,
                                 relevance=relevance[layer, 0])
        # HF DynamicCache layout [B, Hk, T, D], room for the decode steps (full cache kept for later turns).
        kc = torch.empty(1, N + steps, Hk, D, dtype=dtype, device=device).transpose(1, 2)
        vc = torch.empty_like(kc)
        kc[0, :, :N] = k.transpose(0, 1)
        vc[0, :, :N] = v.transpose(0, 1)
        k_full.append(kc)
        v_full.append(vc)

    # 4. Per-layer top-k + gather-pack of all layers.
    keep = max(1, math.ceil(n_vis * (1.0 - decode_sparsity)))
    capacity = P + keep + Q + steps
    with _timed(times, "4 select + pack (all layers)", device):
        kp, vp, lengths, idx = so.select_pack_kv(relevance, [k[:, :, :N] for k in k_full],
                                                 [v[:, :, :N] for v in v_full], vs, ve, keep, capacity)
    found = sum(torch.isin(rel_pos[layer], idx[layer].long()).float().mean().item() for layer in range(L)) / L

    # 5. Decode steps over the packed cache vs the full cache; attention-mass recall per step.
    len_packed = [lengths.clone() for _ in range(L)]
    len_full = [torch.full((1,), N, dtype=torch.int32, device=device) for _ in range(L)]
    keep_mask = torch.zeros(L, Hk, N + steps, dtype=torch.bool, device=device)
    keep_mask[:, :, :vs] = True
    keep_mask[:, :, ve:] = True
    keep_mask.scatter_(2, idx[:, 0].long(), True)
    recalls, max_diff = [], 0.0
    scale = D ** -0.5
    for step in range(steps):
        for layer in range(L):
            qd = (rnd(1, Hq, D) + 8.0 * w[layer].repeat_interleave(G, 0)).to(dtype)
            kn, vn = rnd(1, Hk, D).to(dtype), rnd(1, Hk, D).to(dtype)
            so.append_kv(kn, vn, kp[layer], vp[layer], len_packed[layer])
            out_p, _ = so.decode_attention(qd, kp[layer], vp[layer], len_packed[layer])
            so.append_kv(kn, vn, k_full[layer], v_full[layer], len_full[layer])
            out_f, lse_f = so.decode_attention(qd, k_full[layer], v_full[layer], len_full[layer])
            n = N + step + 1
            s = torch.einsum("hgd,hnd->hgn", qd[0].float().view(Hk, G, D), k_full[layer][0, :, :n].float()) * scale
            p = torch.exp(s - lse_f[0].view(Hk, G, 1))
            recalls.append((p * keep_mask[layer, :, None, :n]).sum(-1).mean().item())
            max_diff = max(max_diff, (out_p.float() - out_f.float()).abs().max().item())
    # Decode time per token: one new query per layer attending over every layer's cache at its final length.
    qd_all = [(rnd(1, Hq, D) + 8.0 * w[layer].repeat_interleave(G, 0)).to(dtype) for layer in range(L)]
    outs = [(torch.empty_like(q), torch.empty(1, Hq, dtype=torch.float32, device=device)) for q in qd_all]
    for name, kc, vc, lens in (("5 decode, packed cache", kp, vp, len_packed),
                               ("5' decode, full cache", k_full, v_full, len_full)):
        def one_token(kc=kc, vc=vc, lens=lens):
            for layer in range(L):
                so.decode_attention(qd_all[layer], kc[layer], vc[layer], lens[layer], out=outs[layer][0],
                                    lse=outs[layer][1])
        times[f"{name} (per token, {L} layers)"] = time_decode_step(one_token, device)
    return {
        "device": str(device), "backend": _backend.requested_backend() or _backend.default_backend(device),
        "size": size, "dtype": str(dtype).replace("torch.", ""),
        "vision_patches": n_patch, "merged_visual_tokens": n_patch // 4, "kept_visual_tokens": n_vis,
        "planted_salient_groups_kept": round(planted_kept, 4),
        "llm_tokens": N, "layers": L, "decode_keep_per_head": keep, "packed_length": int(lengths[0]),
        "question_relevant_keys_selected": round(found, 4),
        "attention_mass_recall_mean": round(sum(recalls) / len(recalls), 4),
        "attention_mass_recall_min": round(min(recalls), 4),
        "decode_steps": steps, "max_abs_diff_packed_vs_full": round(max_diff, 4),
        "times_ms": {k: round(t, 3) for k, t in sorted(times.items())},
    }


def _flag_error(a: argparse.Namespace) -> Optional[str]:
    """The first invalid flag, as one line naming it, or None."""
    err = C.device_flag_error("--device", a.device)
    if err is not None:
        return err
    for flag, val in (("--prefill-sparsity", a.prefill_sparsity), ("--decode-sparsity", a.decode_sparsity)):
        if not 0.0 <= val < 1.0:
            return f"{flag} must be in [0, 1); got {val}"
    if a.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        return f"--json {a.json}: its directory does not exist"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=["qwen2_5_vl", "llava_onevision"], default=None)
    known, rest = pre.parse_known_args(argv)
    if known.model is not None:  # a real model through the HF integration (sparsevila_ops.integrations.demo)
        from .integrations import demo as model_demo
        return model_demo.main(rest, model=known.model)
    p = argparse.ArgumentParser(prog="python -m sparsevila_ops demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["qwen2_5_vl", "llava_onevision"], default=None,
                   help="run a random-weight HF model through enable(model) instead (see --model M --help)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on CUDA, small on CPU")
    p.add_argument("--prefill-sparsity", type=float, default=0.75,
                   help="share of merged visual tokens dropped before the LLM, in [0, 1) (default 0.75)")
    p.add_argument("--decode-sparsity", type=float, default=0.95,
                   help="share of visual KV entries dropped per layer and KV head, in [0, 1) (default 0.95)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary to this file")
    a = p.parse_args(argv)
    err = _flag_error(a)
    if err is not None:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    size = a.size or ("full" if device.type == "cuda" else "small")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cuda":  # JIT-compile every kernel first, so the timings below are steady state
        run(device, size, a.prefill_sparsity, a.decode_sparsity, a.seed, dtype)
    t0 = time.perf_counter()
    res = run(device, size, a.prefill_sparsity, a.decode_sparsity, a.seed, dtype)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"SparseVILA pipeline demo on {res['device']} (backend {res['backend']}, {res['dtype']}, size {size})")
    print(f"  vision: {res['vision_patches']} patches -> {res['merged_visual_tokens']} merged tokens; kept "
          f"{res['kept_visual_tokens']} (prefill sparsity {a.prefill_sparsity}); planted salient groups kept: "
          f"{res['planted_salient_groups_kept']:.0%}")
    print(f"  LLM: {res['llm_tokens']} tokens x {res['layers']} layers; decode keeps {res['decode_keep_per_head']} "
          f"visual tokens per KV head (sparsity {a.decode_sparsity}); packed length {res['packed_length']}; "
          f"question-relevant keys selected: {res['question_relevant_keys_selected']:.0%}")
    print(f"  decode: {res['decode_steps']} steps; attention-mass recall of the packed cache: mean "
          f"{res['attention_mass_recall_mean']:.4f}, min {res['attention_mass_recall_min']:.4f}")
    how = ("GPU time of one CUDA-graph replay" if device.type == "cuda"
           else "wall clock of the eager torch reference")
    print(f"  where the time went (ms; steps 1-4: wall clock of one call with a device sync around it; decode: "
          f"{how}; bench/ has per-kernel timings):")
    for k, t in res["times_ms"].items():
        print(f"    {k:<46} {t:10.3f}")
    print(f"  total {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
