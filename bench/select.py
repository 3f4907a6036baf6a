"""select_kv + pack_kv for every layer (2 launches) vs torch per layer (topk + sort + 2 gathers).

``python -m bench.select [--quick]``. Batch 1, bf16 caches ``[L, 1, Hk, T, 128]`` with a 64-token prefix, the
visual span, and a 64-token suffix; keep 5/15/30 % of the span per (layer, kv head). Outputs are verified
against ``sparsevila_ops.reference`` (indices exactly, packed rows bit-exactly) before timing. Reported: the
two ops alone and together (device spans prebuilt, as in a serving loop), the public API (host spans, so it
includes their small H2D copies), torch, and the pack's achieved HBM bandwidth (read + write of packed rows).
"""
from __future__ import annotations

import argparse

import torch

from bench.common import require_gpu, time_cuda, verify, write_results
import sparsevila_ops as so
from sparsevila_ops import reference as ref

MODELS = {"qwen2-7b": (28, 4), "llama2-7b": (32, 32)}
CONTEXTS = {"qwen2-7b": (8192, 32768, 131072), "llama2-7b": (8192, 32768)}
KEEPS = (0.05, 0.15, 0.30)
PREFIX, SUFFIX, D = 64, 64, 128


def torch_select_pack(scores, k, v, vs, ve, keep, k_out, v_out):
    """Per layer: topk over the span, sort positions, then gather prefix ++ kept ++ suffix for k and v."""
    L, B, H, T, Dh = k.shape
    dev = k.device
    prefix = torch.arange(vs, device=dev).expand(B, H, vs)
    suffix = torch.arange(ve, T, device=dev).expand(B, H, T - ve)
    n = vs + keep + T - ve
    for layer in range(L):
        top = torch.topk(scores[layer, :, :, vs:ve], keep, dim=-1).indices
        pos = torch.cat([prefix, top.sort(dim=-1).values + vs, suffix], dim=-1).unsqueeze(-1).expand(-1, -1, -1, Dh)
        torch.gather(k[layer], 2, pos, out=k_out[layer, :, :, :n])
        torch.gather(v[layer], 2, pos, out=v_out[layer, :, :, :n])


def run_case(model: str, ctx: int, ratio: float, iters: int) -> dict:
    L, H = MODELS[model]
    B, T = 1, PREFIX + ctx + SUFFIX
    vs, ve = PREFIX, PREFIX + ctx
    keep = max(1, round(ratio * ctx))
    n = vs + keep + T - ve
    cap = n + 256
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    scores = torch.rand(L, B, H, T, device=dev)
    k = torch.randn(L, B, H, T, D, device=dev, dtype=dt)
    v = torch.randn(L, B, H, T, D, device=dev, dtype=dt)
    k_layers, v_layers = list(k.unbind(0)), list(v.unbind(0))
    vs_d, ve_d, tl_d = (torch.tensor([x], dtype=torch.int32, device=dev) for x in (vs, ve, T))
    idx = torch.empty(L, B, H, keep, dtype=torch.int32, device=dev)
    k_out = torch.empty(L, B, H, cap, D, device=dev, dtype=dt)
    v_out = torch.empty_like(k_out)
    lengths = torch.empty(B, dtype=torch.int32, device=dev)

    def select():
        torch.ops.sparsevila.select_kv(scores, vs_d, ve_d, keep, idx)

    def pack():
        torch.ops.sparsevila.pack_kv(k_layers, v_layers, idx, vs_d, ve_d, tl_d, k_out, v_out, lengths)

    def both(_=0):
        select()
        pack()

    def api(_=0):
        so.select_kv(scores, vs, ve, keep, indices=idx)
        so.pack_kv(k, v, idx, vs, ve, cap, k_out=k_out, v_out=v_out, lengths=lengths)

    # Verify before timing: indices exactly, packed rows of the first and last layer bit-exactly.
    both()
    ridx = torch.empty_like(idx)
    ref.select_kv(scores, vs_d, ve_d, keep, ridx)
    if not torch.equal(idx, ridx):
        raise AssertionError(f"{model} {ctx} {ratio}: select_kv indices differ from the reference")
    if lengths.item() != n:
        raise AssertionError(f"{model} {ctx} {ratio}: lengths {lengths.item()} != {n}")
    for layer in (0, L - 1):
        for g in range(H):
            pos = ref.packed_positions(ridx[layer, 0, g], vs, ve, T)
            verify("pack k", k_out[layer, 0, g, :n], k[layer, 0, g, pos], 0.0)
            verify("pack v", v_out[layer, 0, g, :n], v[layer, 0, g, pos], 0.0)
    tk_out, tv_out = torch.empty_like(k_out), torch.empty_like(v_out)
    torch_select_pack(scores, k, v, vs, ve, keep, tk_out, tv_out)
    verify("torch pack (sanity)", tk_out[..., :vs, :], k_out[..., :vs, :], 0.0)

    t_sel = time_cuda(lambda i: select(), iters=iters)["median_ms"]
    t_pack = time_cuda(lambda i: pack(), iters=iters)["median_ms"]
    t_ours = time_cuda(both, iters=iters)
    t_api = time_cuda(api, iters=iters)["median_ms"]
    t_torch = time_cuda(lambda i: torch_select_pack(scores, k, v, vs, ve, keep, tk_out, tv_out),
                        iters=max(5, iters // 4))["median_ms"]
    pack_bytes = 2 * 2 * L * B * H * n * D * k.element_size()  # k and v, read + write
    k = v = k_layers = v_layers = k_out = v_out = tk_out = tv_out = None
    torch.cuda.empty_cache()
    return {"model": model, "layers": L, "kv_heads": H, "ctx": ctx, "keep_pct": round(100 * ratio), "keep": keep,
            "select_ms": t_sel, "pack_ms": t_pack, "ours_ms": t_ours["median_ms"], "ours_p20_ms": t_ours["p20_ms"],
            "ours_p80_ms": t_ours["p80_ms"], "api_ms": t_api, "torch_ms": t_torch,
            "speedup": t_torch / t_ours["median_ms"], "pack_TBps": pack_bytes / (t_pack * 1e-3) / 1e12,
            "target_ms": 0.5 if (model, ctx, ratio) == ("qwen2-7b", 32768, 0.05) else None}


def _plot(rows):
    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"{r['model'][:5]} {r['ctx'] // 1024}k {r['keep_pct']}%" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["torch_ms"] for r in rows], 0.4, label="torch per layer")
        ax.bar([i + 0.2 for i in x], [r["ours_ms"] for r in rows], 0.4, label="select_kv + pack_kv (2 launches)")
        ax.set_yscale("log")
        ax.set_ylabel("ms, all layers")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.legend()
    return plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Qwen2-7B 32k at 5 %% and Llama-2-7B 8k at 5 %% only")
    a = p.parse_args(argv)
    if not require_gpu("bench.select"):
        return 0
    if a.quick:
        grid = [("qwen2-7b", 32768, 0.05), ("llama2-7b", 8192, 0.05)]
    else:
        grid = [(m, c, r) for m in MODELS for c in CONTEXTS[m] for r in KEEPS]
    rows = [run_case(m, c, r, iters=10 if a.quick else 30) for m, c, r in grid]
    cols = ["model", "ctx", "keep_pct", "select_ms", "pack_ms", "ours_ms", "api_ms", "torch_ms", "speedup",
            "pack_TBps", "target_ms"]
    write_results("select_pack", rows, cols, plot=_plot(rows),
                  title="select_kv + pack_kv, all layers, batch 1, bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
