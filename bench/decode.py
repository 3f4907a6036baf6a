"""Decode attention, batch 1, one layer: our kernels vs SDPA, dense and 5/15/30 %-packed caches.

``python -m bench.decode [--quick]``. bf16, D 128, Qwen2-7B (28 q / 4 kv heads) and Llama-2-7B (32 / 32),
contexts 2k / 8k / 32k / 128k (2k: the packed cache of bench.e2e's 128k (0.75, 0.95) row, where split +
combine are launch-bound and the cuda backend's single cluster kernel may win). Time per layer as in a captured decode step: one CUDA graph replays the op over R
distinct caches back to back (R >= 8 "layers", enough that R caches exceed the 50 MB L2 where memory allows;
the 5 %-packed caches of 8k/32k still partly fit in L2 with R = 32) and the replay time is divided by R. Timing
single replays instead measures the host's graph-launch latency (~20 µs), not the kernel. SDPA dense is also
timed eagerly (the baseline SDPA users see: 31 / 60 / 113 µs at 8k / 32k / 128k on the H100). Variants:

- ``ours_full``: ``decode_attention`` over the whole cache (lengths = context) on the default backend (Triton:
  split + combine kernels); ``cuda_full``: the same on the cuda backend (one cluster kernel; ``cuda_vs_ours``
  = ours / cuda time);
- ``ours_p5`` / ``ours_p15`` / ``ours_p30``: ``decode_attention`` over a cache packed to 5 / 15 / 30 % of the
  context; ``speedup_pK_vs_sdpa_full`` = SDPA over the dense cache / this (the paper's decode speedup: it
  comes from reading fewer bytes, which the dense kernels cannot beat at 128k, where both run near copy
  bandwidth);
- ``sparse_p5``: ``sparse_decode_attention`` over the full cache with the same 5 % of indices (gather in kernel);
- ``sdpa_full`` / ``sdpa_p5``: ``F.scaled_dot_product_attention(enable_gqa=True)`` on the same tensors.

Achieved TB/s = K + V bytes read / time. Outputs are verified against ``sparsevila_ops.reference`` first.
``--sweep`` times the Triton decode kernel's declared config space (``sparsevila_ops.autotune``) at Qwen2-7B
8k / 32k instead (``decode_sweep.*``), ``--sweep-cuda`` the cluster kernel's (cluster size, clusters per row,
warps) at 8k / 32k / 128k; ``SPARSEVILA_PDL=0`` runs either without programmatic dependent launch.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench.common import require_gpu, time_cuda, verify, write_results
import sparsevila_ops as so
from sparsevila_ops import reference as ref

MODELS = {"qwen2-7b": (28, 4), "llama2-7b": (32, 32)}
CONTEXTS = (2048, 8192, 32768, 131072)  # 2k: a (0.75, 0.95)-packed 128k video's cache (~1.8k entries)
TARGETS_US = {8192: 8.0, 32768: 26.0, 131072: 103.0}
KEEPS = (5, 15, 30)  # % of the context kept in the packed cache
D, SLACK, L2_BYTES = 128, 256, 256 << 20


def _sets(kv_bytes: int) -> int:
    return max(8, min(32, math.ceil(L2_BYTES / kv_bytes)))


def _per_layer_us(fn, n_sets: int, iters: int, graph: bool = True) -> float:
    """Median time of one pass over all n_sets caches (one graph when ``graph``) divided by n_sets, in µs."""
    def all_sets(_):
        for i in range(n_sets):
            fn(i)
    return 1e3 * time_cuda(all_sets, iters=iters, graph=graph)["median_ms"] / n_sets


def _make(B, hq, hk, cap, n_sets, dev, dt, gen):
    qs = [torch.randn(B, hq, D, device=dev, dtype=dt, generator=gen) for _ in range(n_sets)]
    ks = [torch.randn(B, hk, cap, D, device=dev, dtype=dt, generator=gen) for _ in range(n_sets)]
    vs = [torch.randn(B, hk, cap, D, device=dev, dtype=dt, generator=gen) for _ in range(n_sets)]
    return qs, ks, vs


def qwen2_caches(ctx: int, layers: int):
    """Qwen2-7B decode inputs at batch 1, bf16, seeded by ctx: ``layers`` sets of (q, K, V) with capacity
    ctx + SLACK, lengths = [ctx], and (out, lse) buffers per set."""
    hq, hk = MODELS["qwen2-7b"]
    gen = torch.Generator(device="cuda").manual_seed(ctx)
    qs, ks, vs = _make(1, hq, hk, ctx + SLACK, layers, "cuda", torch.bfloat16, gen)
    lengths = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    outs = [(torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")) for q in qs]
    return qs, ks, vs, lengths, outs


def _reference(q, k, v, lengths):
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    ref.decode_attention(q, k, v, lengths, D ** -0.5, out, lse)
    return out


def run_case(model: str, ctx: int, iters: int) -> dict:
    hq, hk = MODELS[model]
    B, dev, dt = 1, "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(ctx)
    n5 = max(1, round(0.05 * ctx))
    row = {"model": model, "ctx": ctx, "kept_p5": n5, "layers_R": _sets(2 * B * hk * ctx * D * 2)}
    kv_full = 2 * B * hk * ctx * D * 2
    kv_p5 = 2 * B * hk * n5 * D * 2  # the gather path reads the same bytes as the 5 % packed cache

    def ours(qs, ks, vs, lengths, outs):
        def fn(i):
            so.decode_attention(qs[i], ks[i], vs[i], lengths, out=outs[i][0], lse=outs[i][1])
        return fn

    def cuda(qs, ks, vs, lengths, outs):
        def fn(i):
            with so.use_backend("cuda"):
                so.decode_attention(qs[i], ks[i], vs[i], lengths, out=outs[i][0], lse=outs[i][1])
        return fn

    def sdpa(qs, ks, vs, n, outs):
        def fn(i):
            outs[i][0].copy_(F.scaled_dot_product_attention(
                qs[i].unsqueeze(2), ks[i][:, :, :n], vs[i][:, :, :n], enable_gqa=True).squeeze(2))
        return fn

    def outs_for(qs):
        return [(torch.empty_like(q), torch.empty(q.shape[:2], device=dev)) for q in qs]

    # Dense cache, lengths = ctx (capacity leaves room to generate).
    n_sets = _sets(kv_full)
    qs, ks, vs = _make(B, hq, hk, ctx + SLACK, n_sets, dev, dt, gen)
    lengths = torch.tensor([ctx], dtype=torch.int32, device=dev)
    outs = outs_for(qs)
    f_ours, f_sdpa = ours(qs, ks, vs, lengths, outs), sdpa(qs, ks, vs, ctx, outs)
    f_ours(0)
    r0 = _reference(qs[0], ks[0], vs[0], lengths)
    verify("decode full", outs[0][0].float(), r0, 2e-2)
    f_sdpa(0)
    verify("sdpa full", outs[0][0].float(), r0, 2e-2)
    row["ours_full_us"] = _per_layer_us(f_ours, n_sets, iters)
    f_cuda = cuda(qs, ks, vs, lengths, outs)
    f_cuda(0)
    verify("decode full (cuda)", outs[0][0].float(), r0, 2e-2)
    row["cuda_full_us"] = _per_layer_us(f_cuda, n_sets, iters)
    row["sdpa_full_us"] = _per_layer_us(f_sdpa, n_sets, iters)
    row["sdpa_full_eager_us"] = _per_layer_us(f_sdpa, n_sets, iters, graph=False)

    # Sparse decode over the same full caches: 5 % of positions per kv head, sorted.
    idx = [torch.stack([torch.randperm(ctx, device=dev, generator=gen)[:n5].sort().values for _ in range(hk)])
           .unsqueeze(0).to(torch.int32) for _ in range(n_sets)]
    n_valid = torch.tensor([n5], dtype=torch.int32, device=dev)

    def f_sparse(i):
        so.sparse_decode_attention(qs[i], ks[i], vs[i], idx[i], n_valid, out=outs[i][0], lse=outs[i][1])
    f_sparse(0)
    gi = idx[0].long().unsqueeze(-1).expand(-1, -1, -1, D)
    r_s = _reference(qs[0], torch.gather(ks[0], 2, gi), torch.gather(vs[0], 2, gi), n_valid)
    verify("sparse decode", outs[0][0].float(), r_s, 2e-2)
    row["sparse_p5_us"] = _per_layer_us(f_sparse, n_sets, iters)
    qs = ks = vs = outs = idx = f_ours = f_cuda = f_sdpa = None
    torch.cuda.empty_cache()

    # Packed caches at 5 / 15 / 30 % (SDPA over the packed cache too at 5 %).
    for keep in KEEPS:
        nk = max(1, round(keep / 100 * ctx))
        n_sets = _sets(2 * B * hk * nk * D * 2)
        qs, ks, vs = _make(B, hq, hk, nk + SLACK, n_sets, dev, dt, gen)
        lengths = torch.tensor([nk], dtype=torch.int32, device=dev)
        outs = outs_for(qs)
        f_ours = ours(qs, ks, vs, lengths, outs)
        f_ours(0)
        verify(f"decode p{keep}", outs[0][0].float(), _reference(qs[0], ks[0], vs[0], lengths), 2e-2)
        row[f"ours_p{keep}_us"] = _per_layer_us(f_ours, n_sets, iters)
        row[f"ours_p{keep}_TBps"] = 2 * B * hk * nk * D * 2 / (row[f"ours_p{keep}_us"] * 1e-6) / 1e12
        row[f"speedup_p{keep}_vs_sdpa_full"] = row["sdpa_full_us"] / row[f"ours_p{keep}_us"]
        if keep == 5:
            row["sdpa_p5_us"] = _per_layer_us(sdpa(qs, ks, vs, nk, outs), n_sets, iters)
        qs = ks = vs = outs = None
        torch.cuda.empty_cache()

    row["ours_full_TBps"] = kv_full / (row["ours_full_us"] * 1e-6) / 1e12
    row["sdpa_full_TBps"] = kv_full / (row["sdpa_full_us"] * 1e-6) / 1e12
    row["sparse_p5_TBps"] = kv_p5 / (row["sparse_p5_us"] * 1e-6) / 1e12
    row["speedup_vs_sdpa"] = row["sdpa_full_us"] / row["ours_full_us"]
    row["cuda_vs_ours"] = row["ours_full_us"] / row["cuda_full_us"]
    row["speedup_vs_sdpa_eager"] = row["sdpa_full_eager_us"] / row["ours_full_us"]
    row["target_us"] = TARGETS_US.get(ctx) if model == "qwen2-7b" else None
    return row


def sweep(ctxs, backend: str = "triton") -> list:
    """Every config of the decode kernel's space on ``backend`` (``autotune.measure``: verified against the
    reference, then timed per layer in a CUDA graph of R distinct caches), Qwen2-7B shapes, bf16, batch 1."""
    from sparsevila_ops import autotune
    hk = MODELS["qwen2-7b"][1]
    rows = []
    for ctx in ctxs:
        qs, ks, vs, lengths, outs = qwen2_caches(ctx, 1)
        args = (qs[0], ks[0], vs[0], lengths, D ** -0.5, outs[0][0], outs[0][1])
        for t in autotune.measure("decode_attention", args, backend=backend, sets=_sets(2 * hk * ctx * D * 2)):
            if t.status != "ok":  # a config that cannot compile, run or verify is reported, not fatal
                print(f"skip {t.config}: {t.status} {t.note}"[:300], flush=True)
                continue
            us = 1e3 * t.ms
            rows.append({"ctx": ctx, **t.config, "us": us, "TBps": 2 * hk * ctx * D * 2 / (us * 1e-6) / 1e12})
            print(rows[-1], flush=True)
        qs = ks = vs = outs = args = None
        torch.cuda.empty_cache()
    return rows


def _plot(rows):
    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        keys = ["sdpa_full_us", "ours_full_us", "ours_p30_us", "ours_p15_us", "sdpa_p5_us", "sparse_p5_us",
                "ours_p5_us"]
        x = range(len(rows))
        w = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + (j - len(keys) / 2) * w for i in x], [r[key] for r in rows], w, label=key[:-3])
        ax.set_yscale("log")
        ax.set_ylabel("µs per layer (CUDA graph of R layers)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['model'][:5]} {r['ctx'] // 1024}k" for r in rows], fontsize=8)
        ax.legend(fontsize=7)
    return plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Qwen2-7B at 2k, 8k and 128k only")
    p.add_argument("--sweep", action="store_true", help="config sweep at Qwen2-7B 8k / 32k (decode_sweep.*)")
    p.add_argument("--sweep-cuda", action="store_true",
                   help="cluster-kernel sweep at Qwen2-7B 8k / 32k / 128k (decode_sweep_cuda.*)")
    a = p.parse_args(argv)
    if not require_gpu("bench.decode"):
        return 0
    if a.sweep_cuda:
        rows = sweep((8192, 32768, 131072), "cuda")
        write_results("decode_sweep_cuda", rows, ["ctx", "cluster", "clusters_per_row", "warps", "us", "TBps"],
                      title="cuda decode (cluster kernel) config sweep, Qwen2-7B, bf16")
        return 0
    if a.sweep:
        rows = sweep((8192, 32768))
        best = {c: min((r for r in rows if r["ctx"] == c), key=lambda r: r["us"]) for c in {r["ctx"] for r in rows}}
        print("best:", best)
        write_results("decode_sweep", rows, ["ctx", "NUM_SPLITS", "BLOCK_N", "num_warps", "num_stages", "COMBINE_D",
                                             "us", "TBps"], title="decode config sweep, Qwen2-7B, bf16")
        return 0
    grid = [("qwen2-7b", 2048), ("qwen2-7b", 8192), ("qwen2-7b", 131072)] if a.quick else [(m, c) for m in MODELS for c in CONTEXTS]
    rows = [run_case(m, c, iters=20 if a.quick else 50) for m, c in grid]
    cols = ["model", "ctx", "ours_full_us", "cuda_full_us", "sdpa_full_us", "sdpa_full_eager_us", "speedup_vs_sdpa",
            "cuda_vs_ours", "ours_full_TBps", "target_us", "ours_p5_us", "sdpa_p5_us", "sparse_p5_us", "ours_p15_us", "ours_p30_us",
            "speedup_p5_vs_sdpa_full", "speedup_p15_vs_sdpa_full", "speedup_p30_vs_sdpa_full", "ours_p5_TBps"]
    write_results("decode", rows, cols, plot=_plot(rows),
                  title="decode attention, batch 1, bf16, per layer inside a CUDA graph of R layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
