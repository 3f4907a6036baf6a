"""Figure 3b: query-aware relevance of every KV entry to the question rows, and the prefill it rides on.

Shapes: Llama-2-7B (32 q / 32 kv heads x 128) and Qwen2-7B (28 / 4 x 128) decoders, bf16, one segment of N
tokens, causal, the last M rows being the question (right-aligned: row i of the question sees j <= i + N - M).

    relevance[g, j] = sum_{h // G == g} sum_{question rows i} softmax_j(scale q_i . k_j)

Variants per (model, N, M):
- ``naive``: torch, the question rows' softmax over all keys materialized in fp32 (chunked over heads to
  <= 2 GB), then reduced (timed as CUDA-graph replays);
- ``kv_relevance``: the standalone Triton kernel, given the rows' lse (attention ran elsewhere); timed as
  CUDA-graph replays (GPU time) and eagerly through the public API (includes ~0.15 ms of host overhead);
- ``fused``: ``prefill_attention(..., rel_rows=[N-M, N))`` over all N rows. Its overhead over the plain prefill
  (target <= 10 %) is measured interleaved: one CUDA graph per input set for each, replayed prefill, fused,
  prefill, fused, ... with events around every replay (consecutive replays use different input sets, so neither
  reads the other's inputs from L2); overhead = median of the per-pair differences, so clock drift between
  the two cancels. ``kv_rel_pct`` = standalone kv_relevance / prefill is the cross-check;
- ``flash_colreduce``: the authors' kernel when importable (recorded absent otherwise).
Second table: the prefill alone vs torch SDPA's flash backend at 8k-32k causal self-attention, with
TFLOP/s = 2 * 2 * Hq * N^2 * D / 2 / t (the causal flop count).

Every output is verified before timing: relevance against ``sparsevila_ops.reference.kv_relevance`` (fp32),
plus sum_{g,j} relevance[g, j] == Hq * M (each row's softmax sums to 1: checks the lse); prefill out against SDPA.

Run: ``python -m bench.figure3_relevance [--quick] [--tune [prefill|relevance]] [--baseline FILE]``
(``--tune`` times every config of the kernels' declared spaces, ``sparsevila_ops.autotune``, instead of the
figure; ``--baseline`` times the ``kv_relevance`` of another copy of ``triton_kernels/prefill.py``, e.g.
``git show HEAD:triton_kernels/prefill.py``, in the same sweep).
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch

import sparsevila_ops as so
from sparsevila_ops import reference
from sparsevila_ops.testing import REL_TOL

from .common import require_gpu, time_cuda, time_interleaved, verify, write_results

MODELS = {"llama2-7b": (32, 32, 128), "qwen2-7b": (28, 4, 128)}
DTYPE = torch.bfloat16
NAIVE_CHUNK_BYTES = 2 << 30


def naive_relevance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Question rows q [M, Hq, D] vs all keys k [N, Hk, D], right-aligned causal: fp32 softmax
    materialized per head chunk, column-summed, then summed over each query group. Returns [Hk, N]."""
    M, Hq, D = q.shape
    N, Hk, _ = k.shape
    G = Hq // Hk
    colsum = torch.empty(Hq, N, dtype=torch.float32, device=q.device)
    masked = torch.arange(N, device=q.device)[None, :] > torch.arange(M, device=q.device)[:, None] + (N - M)
    qh = q.transpose(0, 1)  # [Hq, M, D]
    kh = k.transpose(0, 1)[:, None].expand(Hk, G, N, D).reshape(Hq, N, D)  # query head h reads kv head h // G
    step = max(1, NAIVE_CHUNK_BYTES // (M * N * 4))
    for h0 in range(0, Hq, step):
        h1 = min(Hq, h0 + step)
        s = torch.matmul(qh[h0:h1], kh[h0:h1].transpose(1, 2)).float() * scale
        s.masked_fill_(masked, float("-inf"))
        colsum[h0:h1] = torch.softmax(s, dim=-1).sum(dim=1)
    return colsum.view(Hk, G, N).sum(dim=1)


def _flash_colreduce():
    if importlib.util.find_spec("flash_colreduce") is None:
        return None
    from flash_colreduce import flash_colreduce
    return flash_colreduce


def _inputs(N, hq, hk, D, n_sets):
    return [(torch.randn(N, hq, D, device="cuda", dtype=DTYPE), torch.randn(N, hk, D, device="cuda", dtype=DTYPE),
             torch.randn(N, hk, D, device="cuda", dtype=DTYPE)) for _ in range(n_sets)]


def relevance_grid(Ns, Ms):
    """Rows of the Figure 3b table: naive vs standalone vs fused, and the plain prefill per (model, N)."""
    rows = []
    colreduce = _flash_colreduce()
    for model, (hq, hk, D) in MODELS.items():
        G, scale = hq // hk, D ** -0.5
        for N in Ns:
            big = N > 32768
            n_sets = 1 if big else 3
            warm, iters = (1, 5) if big else (3, 20)
            sets = _inputs(N, hq, hk, D, n_sets)
            cu = torch.tensor([0, N], dtype=torch.int32, device="cuda")
            outs = [torch.empty(N, hq, D, device="cuda", dtype=DTYPE) for _ in range(n_sets)]
            lses = [torch.empty(hq, N, device="cuda") for _ in range(n_sets)]
            rel = torch.empty(hk, N, device="cuda")

            def prefill(i):
                q, k, v = sets[i]
                so.prefill_attention(q, k, v, cu, cu, N, N, scale=scale, causal=True, out=outs[i], lse=lses[i])

            for i in range(n_sets):
                prefill(i)  # also fills each set's lse for kv_relevance
            flops = 2 * hq * N * N * D
            for M in Ms:
                cu_m = torch.tensor([0, M], dtype=torch.int32, device="cuda")
                rr_q = torch.tensor([[0, M]], dtype=torch.int32, device="cuda")
                rr_full = torch.tensor([[N - M, N]], dtype=torch.int32, device="cuda")
                q0, k0, v0 = sets[0]
                expected = torch.empty(hk, N, device="cuda")
                reference.kv_relevance(q0[N - M:], k0, lses[0][:, N - M:], cu_m, cu, M, N, scale, True, rr_q,
                                       expected)
                total = float(expected.sum())
                if abs(total - hq * M) > 1e-3 * hq * M:
                    raise AssertionError(f"relevance sums to {total}, expected Hq*M = {hq * M}: lse is wrong")

                def standalone(i):
                    q, k, _ = sets[i]
                    so.kv_relevance(q[N - M:], k, lses[i][:, N - M:], cu_m, cu, M, N, rr_q, scale=scale,
                                    causal=True, relevance=rel)

                def fused(i):
                    q, k, v = sets[i]
                    so.prefill_attention(q, k, v, cu, cu, N, N, scale=scale, causal=True, rel_rows=rr_full,
                                         out=outs[i], lse=lses[i], relevance=rel)

                def naive(i):
                    q, k, _ = sets[i]
                    return naive_relevance(q[N - M:], k, scale)

                if colreduce is not None:  # no GQA in its API: K expanded to Hq heads outside the timing
                    k_hq = [s_[1].transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0) for s_ in sets]

                    def authors(i):
                        qq = sets[i][0][N - M:].transpose(0, 1).unsqueeze(0)
                        r = colreduce(qq, k_hq[i], "sum", is_causal=True, scale=scale)
                        return r[0].view(hk, G, N).sum(dim=1)

                rel.fill_(float("nan"))
                standalone(0)
                err_sa = verify(f"kv_relevance {model} M={M} N={N}", rel, expected, REL_TOL[torch.float32])
                rel.fill_(float("nan"))
                fused(0)
                err_fu = verify(f"fused relevance {model} M={M} N={N}", rel, expected, REL_TOL[torch.float32])
                err_nv = verify(f"naive relevance {model} M={M} N={N}", naive(0), expected, REL_TOL[DTYPE])
                # kv_relevance and naive: GPU time from CUDA-graph replays (their host overhead, ~0.15 ms per
                # eager call, would otherwise be what is measured); eager kv_relevance reported beside.
                t_sa = time_cuda(standalone, n_inputs=n_sets, warmup=3, iters=10 if big else 30,
                                 graph=True)["median_ms"]
                t_sa_eager = time_cuda(standalone, n_inputs=n_sets, warmup=3, iters=30)["median_ms"]
                t_nv = time_cuda(naive, n_inputs=n_sets, warmup=2, iters=5 if big else 15, graph=True)["median_ms"]
                t_fcr = "absent"
                if colreduce is not None:
                    verify(f"flash_colreduce {model} M={M} N={N}", authors(0), expected, REL_TOL[DTYPE])
                    t_fcr = time_cuda(authors, n_inputs=n_sets, warmup=2, iters=10 if big else 30)["median_ms"]
                    del k_hq
                del expected
                t = time_interleaved(prefill, fused, n_sets, warm, iters)
                t_prefill, t_fu, t_over = t["a_ms"], t["b_ms"], t["diff_ms"]
                rows.append({
                    "model": model, "H": f"{hq}/{hk}", "M": M, "N": N, "naive_ms": t_nv, "kv_relevance_ms": t_sa,
                    "kv_relevance_eager_ms": t_sa_eager,
                    "flash_colreduce_ms": t_fcr,
                    "prefill_ms": t_prefill, "prefill_TFLOPs": flops / t_prefill * 1e-9, "fused_ms": t_fu,
                    "fused_overhead_ms": t_over, "overhead_pct": 100 * t_over / t_prefill,
                    "kv_rel_pct": 100 * t_sa / t_prefill,
                    "naive/kv_rel": t_nv / t_sa, "err_kv_rel": err_sa, "err_fused": err_fu, "err_naive": err_nv,
                })
                print({k: rows[-1][k] for k in ("model", "M", "N", "naive_ms", "kv_relevance_ms", "prefill_ms",
                                                 "fused_ms", "overhead_pct", "kv_rel_pct")}, flush=True)
            sets = outs = lses = None
            torch.cuda.empty_cache()
    return rows


def _sdpa(q, k, v, gqa):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if gqa:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def prefill_vs_sdpa(Ns):
    """Our causal varlen prefill vs SDPA flash ([1, H, N, D] contiguous, GQA native or KV repeated)."""
    rows = []
    for model, (hq, hk, D) in MODELS.items():
        G = hq // hk
        for N in Ns:
            q, k, v = _inputs(N, hq, hk, D, 1)[0]
            cu = torch.tensor([0, N], dtype=torch.int32, device="cuda")
            out = torch.empty_like(q)
            lse = torch.empty(hq, N, device="cuda")
            qs = q.transpose(0, 1).unsqueeze(0).contiguous()
            ks = k.transpose(0, 1).unsqueeze(0).contiguous()
            vs = v.transpose(0, 1).unsqueeze(0).contiguous()
            gqa_mode = "native"
            try:
                ref = _sdpa(qs, ks, vs, G > 1)
            except RuntimeError:
                gqa_mode = "repeat_kv"
                ks, vs = ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1)
                ref = _sdpa(qs, ks, vs, False)
            if G == 1:
                gqa_mode = "none"
            so.prefill_attention(q, k, v, cu, cu, N, N, causal=True, out=out, lse=lse)
            err = verify(f"prefill {model} N={N}", out, ref[0].transpose(0, 1), REL_TOL[DTYPE])
            del ref
            iters = 10 if N > 16384 else 30
            t_ours = time_cuda(lambda i: so.prefill_attention(q, k, v, cu, cu, N, N, causal=True, out=out, lse=lse),
                               warmup=3, iters=iters)["median_ms"]
            t_sdpa = time_cuda(lambda i: _sdpa(qs, ks, vs, gqa_mode == "native"), warmup=3, iters=iters)["median_ms"]
            flops = 2 * hq * N * N * D
            rows.append({"model": model, "H": f"{hq}/{hk}", "N": N, "ours_ms": t_ours, "sdpa_flash_ms": t_sdpa,
                         "ours_TFLOPs": flops / t_ours * 1e-9, "sdpa_TFLOPs": flops / t_sdpa * 1e-9,
                         "sdpa/ours": t_sdpa / t_ours, "sdpa_gqa": gqa_mode, "err_vs_sdpa": err})
            print(rows[-1], flush=True)
            q = k = v = qs = ks = vs = out = None
            torch.cuda.empty_cache()
    return rows


def _load_baseline(path):
    """The launchers of another copy of triton_kernels/prefill.py (same-run A/B of kv_relevance), loaded inside
    the package so its relative imports resolve; its Tunables use their own defaults (their source differs)."""
    spec = importlib.util.spec_from_file_location("sparsevila_ops.triton_kernels._baseline_prefill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tune(what="all", baseline=None):
    """Every config of both kernels' spaces (``autotune.measure``: verified first, then timed as CUDA-graph
    replays) at representative shapes, the default first; with ``baseline``, also that copy's kv_relevance."""
    from sparsevila_ops import autotune
    base = _load_baseline(baseline) if baseline else None
    N, D = 16384, 128
    for model, (hq, hk, _) in MODELS.items():
        if what in ("all", "prefill"):
            args = autotune.make_args("prefill_attention", {"Hq": hq, "Hk": hk, "D": D, "n": N}, "cuda")
            for t in autotune.measure("prefill_attention", args):
                perf = f"{t.ms:.3f} ms {2 * hq * N * N * D / t.ms * 1e-9:.0f} TFLOP/s" if t.ms else t.status
                print(f"TUNE prefill {model} N={N} {t.config}: {perf} {t.note}"[:300], flush=True)
            args = None
        if what not in ("all", "relevance"):
            continue
        for M, Nk in [(64, 8192), (256, 8192), (512, 8192), (256, 32768)]:
            args = autotune.make_args("kv_relevance", {"Hq": hq, "Hk": hk, "D": D, "rows": M, "n": Nk}, "cuda")
            for t in autotune.measure("kv_relevance", args):
                perf = f"{t.ms * 1e3:.1f} us" if t.ms else t.status
                print(f"TUNE kv_relevance {model} M={M} N={Nk} {t.config}: {perf} {t.note}"[:300], flush=True)
            if base is not None:
                rel, good = args[-1], torch.empty_like(args[-1])
                reference.kv_relevance(*args[:-1], good)
                rel.fill_(float("nan"))
                base.kv_relevance(*args)
                verify("baseline relevance", rel, good, REL_TOL[torch.float32])
                ms = time_cuda(lambda i: base.kv_relevance(*args), warmup=3, iters=30, graph=True)["median_ms"]
                print(f"TUNE kv_relevance {model} M={M} N={Nk} baseline: {ms * 1e3:.1f} us", flush=True)
            args = None


def _plot(rel_rows, pf_rows):
    def plot(fig):
        axes = fig.subplots(1, 3)
        for ax, model in zip(axes[:2], MODELS):
            rs = [r for r in rel_rows if r["model"] == model]
            labels = [f"{r['M']}x{r['N'] // 1024}k" for r in rs]
            x = range(len(rs))
            ax.plot(x, [r["naive_ms"] for r in rs], "o-", label="naive torch (fp32 softmax)")
            ax.plot(x, [r["kv_relevance_ms"] for r in rs], "s-", label="kv_relevance (standalone)")
            ax2 = ax.twinx()
            ax2.plot(x, [r["overhead_pct"] for r in rs], "^:", color="tab:green", label="fused: % over prefill")
            ax2.axhline(10, color="tab:green", lw=0.6, ls="--")
            ax2.set_ylabel("fused relevance overhead (% of prefill)", fontsize=8)
            ax2.legend(fontsize=7, loc="lower right")
            ax.set_xticks(list(x), labels, rotation=60, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms")
            ax.set_xlabel("question rows x keys")
            ax.set_title(f"relevance, {model} ({MODELS[model][0]}/{MODELS[model][1]} x 128)", fontsize=9)
            ax.legend(fontsize=7)
        ax = axes[2]
        for model in MODELS:
            rs = [r for r in pf_rows if r["model"] == model]
            ax.plot([r["N"] // 1024 for r in rs], [r["ours_TFLOPs"] for r in rs], "o-", label=f"ours {model}")
            ax.plot([r["N"] // 1024 for r in rs], [r["sdpa_TFLOPs"] for r in rs], "x--", label=f"SDPA flash {model}")
        ax.set_xlabel("N (k tokens), causal")
        ax.set_ylabel("TFLOP/s")
        ax.set_title("prefill attention", fontsize=9)
        ax.legend(fontsize=7)
    return plot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (8k keys, 64-512 rows, 8k prefill)")
    ap.add_argument("--tune", nargs="?", const="all", choices=["all", "prefill", "relevance"],
                    help="sweep kernel tiles (both kernels, or the one named) and print timings, then exit")
    ap.add_argument("--baseline", metavar="FILE",
                    help="with --tune: also time kv_relevance from this copy of triton_kernels/prefill.py")
    args = ap.parse_args(argv)
    if not require_gpu("bench.figure3_relevance"):
        return 0
    torch.manual_seed(0)
    if args.tune:
        tune(args.tune, args.baseline)
        return
    t0 = time.time()
    Ns, Ms, pf_Ns = ([8192], [64, 128, 256, 512], [8192]) if args.quick else ([8192, 32768, 131072], [64, 128, 256, 512],
                                                                      [8192, 16384, 32768])
    pf_rows = prefill_vs_sdpa(pf_Ns)
    rel_rows = relevance_grid(Ns, Ms)
    print(f"grid ran in {time.time() - t0:.0f} s")
    write_results("figure3b_prefill_vs_sdpa", pf_rows,
                  ["model", "H", "N", "ours_ms", "sdpa_flash_ms", "ours_TFLOPs", "sdpa_TFLOPs", "sdpa/ours",
                   "sdpa_gqa", "err_vs_sdpa"], title="Prefill attention vs SDPA flash (causal, bf16)")
    write_results("figure3b_relevance", rel_rows,
                  ["model", "H", "M", "N", "naive_ms", "kv_relevance_ms", "kv_relevance_eager_ms", "naive/kv_rel",
                   "prefill_ms",
                   "prefill_TFLOPs", "fused_ms", "fused_overhead_ms", "overhead_pct", "kv_rel_pct",
                   "flash_colreduce_ms"],
                  plot=_plot(rel_rows, pf_rows),
                  title="Figure 3b: query-aware relevance (causal right-aligned, bf16)")


if __name__ == "__main__":
    main()
