"""Figure 3a: query-agnostic salience (``visual_salience``) at SigLIP and QwenVL shapes, bf16.

``python -m bench.figure3_salience [--quick] [--shape NAME ...] [--sweep] [--poly-share]``. Per shape: naive torch
(the fp32 chunked reference) vs Triton two passes (atomic and deterministic head reduction) vs Triton with ``lse``
given vs the cuda backend (its default config, then each kernel: ``csrc/salience_wgmma.cu``, ``csrc/salience.cu``;
two passes, lse given; when it can run here) vs ``flash_colreduce`` (when importable) vs one SDPA forward of the
same shape (yardstick). The exp floor is ``passes * H * sum_s n_s^2 / 3.9e12 exp/s``; ``Texp_per_s`` and ``TFLOP_s``
are the achieved exp2 rate and QK^T rate (``passes * 2 H sum_s n_s^2 D`` FLOP). Each kernel row is also timed in a
back-to-back loop of ~0.5 s (``sustained_ms``) while NVML samples the GPU (``bench.common.GpuSampler``): its median
SM clock, power and share of readings power-capped, and the exp floor at that clock (``x_floor_at_clock``: 16 exp2
per clock per SM), since a long pass can run below the clock the nominal floor assumes (the H200 holds 700 W by
lowering its clock). ``--sweep`` times every config of each Triton pass's declared space (``sparsevila_ops.autotune``;
each pass alone, the column sums given an LSE) instead. ``--poly-share`` adds cuda rows per kernel and polynomial
share (``poly_every`` 2, 4, 8: every k-th column pair's exp2 on the FMA pipe).
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import sparsevila_ops
from bench.common import GpuSampler, peak_extra_memory, require_gpu, time_cuda, verify, write_results
from sparsevila_ops import reference
from sparsevila_ops._device import sm_count

EXP_PER_S = 3.9e12  # H100 MUFU: 16 exp/clk/SM x 132 SMs x 1.83 GHz
EXP_PER_CLK_SM = 16  # MUFU ex2 per clock per SM (sm_80 and later)
SUSTAINED_S = 0.5  # the clock-sampled loop's length
BF16_TOL = 2e-2  # tests/helpers.py REL_TOL[bfloat16]


@dataclass
class Shape:
    name: str
    B: int  # segments (frames / windows), each of length N
    N: int
    H: int = 16
    D: int = 80
    naive_ms: Optional[float] = None  # baselines measured on an H100 in an earlier run (bench/NOTES.md)
    colreduce_ms: Optional[float] = None
    sdpa_ms: Optional[float] = None
    target_2pass_ms: Optional[float] = None
    target_lse_ms: Optional[float] = None

    @property
    def exps_per_pass(self) -> float:
        return float(self.H) * self.B * self.N * self.N

    @property
    def flops_per_pass(self) -> float:
        return 2.0 * self.exps_per_pass * self.D


SHAPES = [
    Shape("SigLIP 64 frames", 64, 729, D=72, naive_ms=7.18, colreduce_ms=1.76, sdpa_ms=0.63,
          target_2pass_ms=0.55, target_lse_ms=0.30),
    Shape("SigLIP 256 frames", 256, 729, D=72, naive_ms=28.7, colreduce_ms=6.75, sdpa_ms=2.20,
          target_2pass_ms=2.0, target_lse_ms=1.1),
    Shape("QwenVL 4k", 1, 4096, naive_ms=3.22, colreduce_ms=0.79, sdpa_ms=0.25, target_2pass_ms=0.25,
          target_lse_ms=0.14),
    Shape("QwenVL 16k", 1, 16384, naive_ms=47.3, colreduce_ms=8.64, sdpa_ms=3.15, target_2pass_ms=2.9,
          target_lse_ms=1.6),
    Shape("QwenVL 32k", 1, 32768, naive_ms=221.0, colreduce_ms=32.0, sdpa_ms=13.9, target_2pass_ms=11.5,
          target_lse_ms=6.2),
    Shape("QwenVL window 16k (64-patch windows)", 256, 64),
    Shape("QwenVL frames 64k (1024-token segments)", 64, 1024),  # the salience layer of e2e's full attention
    Shape("QwenVL 2k segments (32 x 2048 tokens)", 32, 2048),  # between the 1024 and 4096 of the backend choice
]
# Only by --shape: segment lengths around 1024, ~64k tokens each like the 1024-token shape, where Triton beat the
# cuda kernels on sm_90 at 961-1056 tokens until their column sums took the wgmma A operand from registers (896, 1280
# and 1536 were measured at db88c8a, 960, 1088, 1152 and 1216 at e4843b8, these four again after that change: cuda
# faster at each, bench/NOTES.md)
BOUND_SHAPES = [Shape(f"{n}-token segments ({b} x {n})", b, n)
                for b, n in ((68, 960), (64, 1000), (62, 1056), (60, 1088))]
# Only by --shape: lengths between 1024 and 2048 ("QwenVL 2k segments"), where the wgmma kernel's tile shape
# (four 64-row consumers or two of 128, cuda_salience._default) was measured at a53db83 and again after the
# four consumers' column sums took -lse from a producer warp
TILE_BOUND_SHAPES = [Shape(f"{n}-token segments ({b} x {n})", b, n)
                     for b, n in ((54, 1216), (50, 1280), (42, 1536), (36, 1792))]
QUICK = ("SigLIP 64 frames", "QwenVL 4k", "QwenVL window 16k (64-patch windows)")
N_INPUTS = 2  # rotating input sets: every set is larger than the 50 MB L2


def _natural_lse(q: torch.Tensor, k: torch.Tensor, B: int, N: int, scale: float) -> torch.Tensor:
    """Row LSE ``[H, B*N]`` (natural log, fp32), as an attention forward returns it; chunked over rows."""
    H, D = q.shape[1:]
    qb, kb = q.view(B, N, H, D).float(), k.view(B, N, H, D).float()
    lse = torch.empty(H, B, N, device=q.device)
    rows = max(1, (1 << 27) // (B * H * N))
    for r0 in range(0, N, rows):
        s = torch.einsum("brhd,bnhd->hbrn", qb[:, r0:r0 + rows], kb) * scale
        lse[:, :, r0:r0 + rows] = torch.logsumexp(s, dim=-1)
    return lse.view(H, B * N)


def _flash_colreduce():
    try:
        from flash_colreduce import flash_colreduce
        return flash_colreduce
    except ImportError:
        return None


def _inputs(sh: Shape, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sh.B * sh.N
    return [torch.randn(T, sh.H, sh.D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def _cuda_usable() -> Optional[str]:
    """None when the cuda backend can run visual_salience here, else why not (the rows then carry the note)."""
    if "cuda" in sparsevila_ops.available_backends("visual_salience", "cuda"):
        return None
    from sparsevila_ops import _cuda
    return _cuda.unusable(torch.device("cuda")) or "not available"


def sustained(fn: Callable[[int], object], probe_ms: float, exps: float) -> Dict[str, object]:
    """``fn``'s median over ~``SUSTAINED_S`` of back-to-back calls with the GPU's clock and power sampled during
    them, and the exp floor of ``exps`` at the median clock; only the time where NVML cannot be read."""
    n = max(10, int(SUSTAINED_S * 1e3 / max(probe_ms, 1e-3)))
    with GpuSampler(period_s=0.01) as gpu:
        ms = time_cuda(fn, n_inputs=N_INPUTS, warmup=0, iters=n)["median_ms"]
    row: Dict[str, object] = {"sustained_ms": ms}
    got = gpu.summary()
    if got:
        mhz = got["sm_clock_median_mhz"]
        floor = exps / (EXP_PER_CLK_SM * sm_count(torch.device("cuda")) * mhz * 1e6) * 1e3
        row.update(sm_mhz=mhz, power_w=got["power_median_w"], capped=got["power_capped_share"],
                   exp_floor_at_clock_ms=floor, x_floor_at_clock=ms / floor)
    return row


def bench_shape(sh: Shape, iters: int, poly_share: bool = False) -> List[Dict[str, object]]:
    T, scale = sh.B * sh.N, sh.D ** -0.5
    cu = torch.arange(0, T + 1, sh.N, dtype=torch.int32, device="cuda")
    sets = [_inputs(sh, 100 + i) for i in range(N_INPUTS)]
    lses = [_natural_lse(q, k, sh.B, sh.N, scale) for q, k, _ in sets]
    out = torch.empty(T, device="cuda")

    def naive(i):
        q, k, _ = sets[i]
        reference.visual_salience(q, k, cu, sh.N, scale, 0, None, False, out)

    def two_pass(i, deterministic=False):  # the Triton rows (covered inputs default to cuda on Hopper)
        q, k, _ = sets[i]
        with sparsevila_ops.use_backend("triton"):
            sparsevila_ops.visual_salience(q, k, cu, sh.N, out=out, deterministic=deterministic)

    def lse_given(i):
        q, k, _ = sets[i]
        with sparsevila_ops.use_backend("triton"):
            sparsevila_ops.visual_salience(q, k, cu, sh.N, out=out, lse=lses[i])

    def cuda_call(i, given, cfg=None):  # given: with the LSE (one pass)
        q, k, _ = sets[i]
        if cfg is None:  # the library's path: the backend's default config
            with sparsevila_ops.use_backend("cuda"):
                sparsevila_ops.visual_salience(q, k, cu, sh.N, out=out, lse=lses[i] if given else None)
        else:
            from sparsevila_ops.cuda_salience import SALIENCE_CUDA
            SALIENCE_CUDA.launch(q, k, cu, sh.N, scale, 0, lses[i] if given else None, False, out, cfg)

    def sdpa(i):
        q, k, v = (t.view(sh.B, sh.N, sh.H, sh.D).transpose(1, 2) for t in sets[i])
        F.scaled_dot_product_attention(q, k, v)

    impls: List[tuple] = [
        ("naive torch (fp32 reference)", naive, 0, sh.naive_ms, None),
        ("triton 2 passes", two_pass, 2, None, sh.target_2pass_ms),
        ("triton 2 passes, deterministic", lambda i: two_pass(i, True), 2, None, sh.target_2pass_ms),
        ("triton lse given", lse_given, 1, None, sh.target_lse_ms),
    ]
    cuda_why = _cuda_usable()
    if cuda_why is None:
        impls += [("cuda 2 passes", lambda i: cuda_call(i, False), 2, None, sh.target_2pass_ms),
                  ("cuda lse given", lambda i: cuda_call(i, True), 1, None, sh.target_lse_ms)]
        from sparsevila_ops.cuda_salience import POLY_EVERY, WGMMA_TILES
        kernels = [("wgmma", c, n) for c, n in WGMMA_TILES] + [("mma", 2, 128)]
        for kern, c, n in kernels:  # each kernel (wgmma: each tile shape) without polynomial exp2s, then (--poly-share)
            for p in POLY_EVERY if poly_share else (0,):  # at every share
                cfg = {"kernel": kern, "poly_every": p, "consumers": c, "tile_n": n}
                tag = f"cuda {kern}" + (f" {c}x{n}" if kern == "wgmma" else "") + (f", poly_every={p}" if p else "")
                impls += [(f"{tag} 2 passes", functools.partial(cuda_call, given=False, cfg=cfg), 2, None, None),
                          (f"{tag} lse given", functools.partial(cuda_call, given=True, cfg=cfg), 1, None, None)]
    fcr = _flash_colreduce()
    if fcr is not None:
        def colreduce(i):  # its [B, H, N] column sums, then the head sum and the 1/(H N) of the mean
            q, k = (t.reshape(sh.B, sh.N, sh.H, sh.D).transpose(1, 2) for t in sets[i][:2])
            out.copy_(fcr(q, k, "sum").sum(1).flatten().div_(sh.H * sh.N))
        impls.append(("flash-colreduce", colreduce, 2, sh.colreduce_ms, None))
    impls.append(("SDPA fwd (yardstick)", sdpa, 1, sh.sdpa_ms, None))

    # Oracle for set 0, then verify each salience implementation before timing it.
    naive(0)
    torch.cuda.synchronize()
    ref = out.clone()
    ref_lse = torch.empty_like(ref)
    reference.visual_salience(sets[0][0], sets[0][1], cu, sh.N, scale, 0, lses[0], False, ref_lse)

    rows, naive_median = [], None
    for name, fn, passes, anchor, target in impls:
        row: Dict[str, object] = {"shape": f"{sh.name} ({sh.B}x{sh.H}x{sh.N}x{sh.D})", "impl": name,
                                  "anchor_ms": anchor, "target_ms": target}
        if name.startswith(("triton", "cuda")) or name == "flash-colreduce":
            out.fill_(float("nan"))
            fn(0)
            try:
                row["rel_err"] = verify(name, out, ref_lse if "lse given" in name else ref, BF16_TOL)
            except AssertionError as e:
                if not name.startswith("cuda"):
                    raise
                row["note"] = str(e)  # the other rows are still measured
                rows.append(row)
                continue
        n_it = iters
        if name.startswith("naive"):
            t0 = time_cuda(fn, n_inputs=N_INPUTS, warmup=1, iters=1)["median_ms"]
            if t0 > 30e3:
                row["note"] = f"skipped: one call took {t0 / 1e3:.0f} s"
                rows.append(row)
                continue
            n_it = max(3, min(iters, int(3e3 / max(t0, 1e-3))))
        row.update(time_cuda(fn, n_inputs=N_INPUTS, warmup=3, iters=n_it))
        row["peak_extra_MB"] = peak_extra_memory(lambda: fn(0)) / 2**20
        med = row["median_ms"]
        if passes:
            floor = passes * sh.exps_per_pass / EXP_PER_S * 1e3
            row["exp_floor_ms"], row["x_floor"] = floor, med / floor
            if not name.startswith("SDPA"):
                row["Texp_per_s"] = passes * sh.exps_per_pass / (med * 1e-3) / 1e12
                row["TFLOP_s"] = passes * sh.flops_per_pass / (med * 1e-3) / 1e12
                row.update(sustained(fn, med, passes * sh.exps_per_pass))
        if name.startswith("naive"):
            naive_median = med
        if naive_median:
            row["speedup_vs_naive"] = naive_median / med
        if target:
            row["target/time"] = target / med
        rows.append(row)
    if fcr is None:
        rows.append({"shape": rows[0]["shape"], "impl": "flash-colreduce", "anchor_ms": sh.colreduce_ms,
                     "note": "absent (pip flash-colreduce not installed on this machine)"})
    if cuda_why is not None:
        rows.append({"shape": rows[0]["shape"], "impl": "cuda", "note": f"cuda backend unavailable: {cuda_why}"})
    sets = lses = None
    torch.cuda.empty_cache()
    return rows


def sweep(shapes: List[Shape], iters: int) -> None:
    """Every config of both passes' spaces (``autotune.measure``: verified first, then timed; the default first),
    each pass alone: its floor is one pass of exps."""
    from sparsevila_ops import autotune
    from sparsevila_ops.autotune.tuner import cuda_timer
    timer = functools.partial(cuda_timer, iters=iters)
    rows = []
    for sh in shapes:
        shape = {"H": sh.H, "D": sh.D, "n": sh.N, "segs": sh.B}
        floor = sh.exps_per_pass / EXP_PER_S * 1e3
        for phase in ("colsum", "lse"):
            op = f"visual_salience.{phase}"
            args = autotune.make_args(op, shape, "cuda")
            for t in autotune.measure(op, args, timer=timer, sets=N_INPUTS):
                ms = t.ms if t.ms is not None else float("inf")
                err = t.err if t.status == "ok" else f"{t.status}: {t.note}"[:80]
                rows.append({"shape": sh.name, "phase": phase, "config": str(t.config), "median_ms": ms,
                             "x_floor": ms / floor, "rel_err": err})
                print(f"{sh.name[:12]:12s} {phase:6s} {ms:8.4f} ms  {t.config}  err={err}", flush=True)
            del args
    write_results("figure3_salience_sweep", rows, ["shape", "phase", "config", "median_ms", "x_floor", "rel_err"],
                  title="visual_salience config sweep")


def _plot(rows: List[Dict[str, object]]) -> Callable[[object], None]:
    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        impls = [i for i in dict.fromkeys(r["impl"] for r in rows)
                 if any(r["impl"] == i and r.get("median_ms") for r in rows)]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for s_i, s in enumerate(shapes):
                r = next((r for r in rows if r["shape"] == s and r["impl"] == impl), None)
                if r is not None and r.get("median_ms"):
                    xs.append(s_i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["median_ms"])
            ax.bar(xs, ys, width, label=impl)
        for s_i, s in enumerate(shapes):
            for r in rows:
                if r["shape"] == s and r.get("target_ms") and r["impl"] in ("triton 2 passes", "triton lse given"):
                    ax.plot([s_i - 0.4, s_i + 0.4], [r["target_ms"]] * 2, "k--" if "2" in r["impl"] else "k:",
                            lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("latency per layer (ms, log)")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(" (", "\n(") for s in shapes], fontsize=7)
        ax.legend(fontsize=7, title="dashed: target 2 passes, dotted: target lse given", title_fontsize=7)
    return plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SigLIP 64 frames, QwenVL 4k and the window layer only")
    p.add_argument("--sweep", action="store_true", help="time kernel configurations instead of the figure")
    p.add_argument("--poly-share", action="store_true",
                   help="also time the cuda backend at every polynomial share (poly_every 0, 2, 4, 8)")
    p.add_argument("--shape", action="append", default=None, metavar="NAME",
                   choices=[s.name for s in SHAPES + BOUND_SHAPES + TILE_BOUND_SHAPES],
                   help="only this shape (repeatable; default: the figure's, or --quick's; the segment lengths around "
                   "the backend switch and the wgmma tile bound only by name)")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args(argv)
    if not require_gpu("bench.figure3_salience"):
        return 0
    shapes = [s for s in SHAPES if (not a.quick or s.name in QUICK) and (a.shape is None or s.name in a.shape)]
    shapes += [s for s in BOUND_SHAPES + TILE_BOUND_SHAPES if a.shape is not None and s.name in a.shape]
    if a.sweep:
        sweep([s for s in shapes if s.name in ("SigLIP 64 frames", "QwenVL 4k", "QwenVL 16k")], a.iters)
        return 0
    rows = []
    for sh in shapes:
        rows += bench_shape(sh, a.iters, a.poly_share)
        print(f"done {sh.name}", flush=True)
    cols = ["shape", "impl", "median_ms", "p20_ms", "p80_ms", "peak_extra_MB", "exp_floor_ms", "x_floor",
            "Texp_per_s", "TFLOP_s", "sustained_ms", "sm_mhz", "power_w", "capped", "exp_floor_at_clock_ms",
            "x_floor_at_clock", "speedup_vs_naive", "anchor_ms", "target_ms", "target/time", "rel_err", "note"]
    write_results("figure3_salience", rows, cols, plot=_plot(rows),
                  title="Figure 3a: visual_salience (bf16, per layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
