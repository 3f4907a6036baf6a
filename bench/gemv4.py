"""Decode GEMVs: one Qwen2.5-7B decoder layer's linear layers at batch 1-8, in CUDA graphs (4-bit and bf16).

``python -m bench.gemv4 [--quick] [--batches 1 8] [--methods cuda tinygemm] [--name N] [--sweep]``. Shapes (N x K),
fused: qkv 4608x3584, o 3584x3584, gate_up 37888x3584, down 3584x18944 (233 M weights: 466 MB in bf16; 4-bit with
group 128 bf16 scales and uint8 zeros: 122 MB); and per module, as transformers' Qwen2.5-VL decoder holds them (what
``quantize_model_linears`` and ``bench/e2e.py`` run): q 3584x3584, k and v 512x3584, gate and up 18944x3584 (same
weights, 7 GEMVs). Rows ``layer`` (fused: 4 GEMVs) and ``layer_unfused`` (7 GEMVs) time the whole layer. Methods,
all on the same quantized values:

- ``bf16``: ``torch.nn.functional.linear`` on the bf16 weight (cuBLAS);
- ``gemv``: ``sparsevila_ops.gemv`` on the bf16 weight (our dense GEMV, ``csrc/gemv.cu`` where the cuda backend
  runs: what the integration's decode step uses instead of cuBLAS);
- ``tinygemm``: PyTorch's ``aten._weight_int4pack_mm`` (weight from ``aten._convert_weight_to_int4pack`` of the
  uint8 ``[N, K/2]`` nibbles, inner k tiles 8; its dequant is ``(q - 8) * scale + zero``, so zero = (8 - z) s);
- ``gemlite``: ``gemlite.helper.A16Wn`` when gemlite imports (a note says why not otherwise; the offline GPU image
  has none: ``bash bench/wheels.sh`` builds its wheel into ``.whl``, which ``bench/gpu_check.sh`` installs when the
  device call carries it);
- ``triton`` and ``cuda``: ``sparsevila_ops.quant.w4a16_linear`` on each of our backends (``triton_kernels/gemv4.py``
  and ``csrc/gemv4.cu``; the looked-up config: a tuned table's, else the default heuristic).

Each time is one CUDA graph that runs R weight sets back to back (R copies, so that they exceed the L2 by far),
divided by R: per linear layer, and for the whole layer (its four or seven GEMVs per set; ``cuda_parts_us``: the sum
of the layer's GEMVs timed alone in the same round, ``cuda_layer_over_parts`` the layer over it). Effective TB/s =
the method's own weight bytes / time. ``floor4_us`` (``floor16_us``) = our 4-bit (the bf16) bytes / the device copy
bandwidth measured in the same run; ``cuda_over_floor`` and ``cuda_vs_<method>`` compare the cuda backend (the
default on the GPU) with them, ``gemv_over_floor16`` and ``gemv_vs_bf16`` our dense GEMV.
Every method's output is verified against dequantize-then-matmul in fp32 before it is timed: ours and the bf16
methods within 1e-2 (relative L2); the 4-bit baselines within 1e-1 (a wrong kernel), and an error above 2e-2 is
timed but named in the notes (gemlite's GEMV, batch <= 4, adds its split-K partial sums into the bf16 output with
atomics: 2.04e-2 on ``down``, K = 18944, at batch 4 on the H200).
``--sweep [--backend B]`` times one of our kernels' declared config space (``sparsevila_ops.autotune``: the default
first) per shape instead, each config verified first; ``--sweep --op gemv`` times the dense GEMV's space on the
fused layer's shapes as the integration runs them (q/k/v, o, gate/up with ``glu``, down), ``--fused`` limits the
W4A16 sweep to those. ``--methods`` times only the methods named; a batch named twice in ``--batches`` is timed
again in that order (``--batches 1 2 1 2 --methods cuda``: interleaved rounds, e.g. to check a layer against the
sum of its GEMVs, one machine's drift apart).
"""
from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

import sparsevila_ops as so

from bench.common import copy_bandwidth_tbps, require_gpu, time_cuda, verify, write_results
from sparsevila_ops import quant as Q

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),  # N, K
          "q": (3584, 3584), "k": (512, 3584), "v": (512, 3584), "gate": (18944, 3584), "up": (18944, 3584)}
LAYERS = {"layer": ("qkv", "o", "gate_up", "down"),  # fused projections
          "layer_unfused": ("q", "k", "v", "o", "gate", "up", "down")}  # transformers' Qwen2.5-VL decoder layer
GROUP = 128
L2_BYTES = 256 << 20  # R copies of a weight exceed this (5x the H100/H200 L2)
METHODS = ("bf16", "gemv", "tinygemm", "gemlite", "triton", "cuda")
OURS = ("triton", "cuda")  # our backends of sparsevila_quant::w4a16_linear
# relative L2 error allowed before timing; a baseline's error above BASELINE_NOTE is timed and named in the notes
TOL = {"bf16": 1e-2, "gemv": 1e-2, "triton": 1e-2, "cuda": 1e-2, "tinygemm": 1e-1, "gemlite": 1e-1}
BASELINE_NOTE = 2e-2
# the integration's fused decode layer: name -> (N outputs, K, glu)
FUSED = {"qkv": (4608, 3584, False), "o": (3584, 3584, False), "gate_up": (18944, 3584, True),
         "down": (3584, 18944, False)}


def _tinygemm(w4):
    """(packed weight, scales_and_zeros [K/G, N, 2] bf16) for ``aten._weight_int4pack_mm``."""
    q = Q._unpack(w4.qweight)
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), 8)
    s = w4.scales.float()
    sz = torch.stack([s, (8 - w4.zeros.float()) * s], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def _gemlite(w4):
    """A gemlite layer on the same (q, s, z), or (None, why)."""
    try:
        from gemlite.helper import A16Wn
    except ImportError as e:
        return None, f"gemlite not importable ({e})"
    try:
        q = Q._unpack(w4.qweight).to(torch.uint8)
        layer = A16Wn(device="cuda").from_weights(q, w4.scales.t().contiguous(),
                                                  w4.zeros.t().to(w4.dtype).contiguous(), 4, w4.group_size)
    except Exception as e:  # noqa: BLE001 - a gemlite API change is reported, not fatal
        return None, f"gemlite failed to pack: {type(e).__name__}: {e}"[:200]
    return layer, None


class Layer:
    """One weight of ``shape`` in every method's format, R copies each (distinct memory)."""

    def __init__(self, name: str, copies: int, gen: torch.Generator, notes: dict, methods=METHODS):
        """The baselines' formats only for the ``methods`` to be timed (gemlite packs each copy slowly)."""
        N, K = SHAPES[name]
        self.name, self.N, self.K, self.copies = name, N, K, copies
        w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        w4 = Q.quantize_w4(w, GROUP)
        tiny = gem = None
        if "tinygemm" in methods:
            try:
                tiny = _tinygemm(w4)
            except Exception as e:  # noqa: BLE001 - an aten signature change is reported, not fatal
                notes.setdefault("tinygemm", f"tinygemm failed to pack: {type(e).__name__}: {e}"[:200])
        if "gemlite" in methods:
            gem, why = _gemlite(w4)
            if why:
                notes.setdefault("gemlite", why)
        self.bytes = {"bf16": w.numel() * 2, "gemv": w.numel() * 2, "triton": w4.nbytes, "cuda": w4.nbytes,
                      "gemlite": w4.nbytes, "tinygemm": sum(t.numel() * t.element_size() for t in tiny) if tiny else None}
        clone = lambda ts: [t.clone() for t in ts]  # noqa: E731
        self.bf16 = [w] + [w.clone() for _ in range(copies - 1)]
        self.tiny = None if tiny is None else [tiny] + [tuple(clone(tiny)) for _ in range(copies - 1)]
        self.ours = [w4] + [Q.W4Weight(*clone((w4.qweight, w4.scales, w4.zeros)), GROUP) for _ in range(copies - 1)]
        self.gem = None if gem is None else [gem] + [_gemlite(w4)[0] for _ in range(copies - 1)]

    def fn(self, method: str, r: int):
        """A callable ``x -> y`` for copy ``r`` (None when the method is unavailable)."""
        if method == "bf16":
            return lambda x: F.linear(x, self.bf16[r])
        if method == "gemv":
            return lambda x: so.gemv(x, self.bf16[r])
        if method == "tinygemm":
            if self.tiny is None:
                return None
            packed, sz = self.tiny[r]
            return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
        if method == "gemlite":
            return None if self.gem is None else self.gem[r]
        return functools.partial(_ours, method, self.ours[r])

    def check(self, method: str, x: torch.Tensor) -> float:
        """``method``'s relative error vs fp32 x @ W^T (the bf16 weight for bf16, the dequantized 4-bit one
        otherwise), raising above ``TOL[method]``; the fp32 weight is built for the check and freed with it."""
        w = self.bf16[0].float() if method in ("bf16", "gemv") else Q.dequantize_w4(self.ours[0], torch.float32)
        ref = x.float() @ w.t()
        del w
        return verify(f"{method} {self.name} M={x.shape[0]}", self.fn(method, 0)(x).float(), ref, TOL[method])


def _ours(backend: str, w4, x):
    with so.use_backend(backend):
        return Q.w4a16_linear(x, w4)


def _graph_us(calls, iters: int) -> float:
    """Median µs of one CUDA-graph replay of ``calls`` run back to back."""
    def run(_):
        for c in calls:
            c()
    return 1e3 * time_cuda(run, iters=iters, graph=True)["median_ms"]


def _copies(nbytes: int) -> int:
    return max(2, math.ceil(L2_BYTES / nbytes))


def run(batches, iters: int, methods=METHODS) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(0)
    notes: dict = {}
    copy_tbps = copy_bandwidth_tbps()
    layers = {}
    for name, (N, K) in SHAPES.items():
        layers[name] = Layer(name, _copies(N * K // 2), gen, notes, methods)
    layer_bytes = {layer: {m: sum(layers[n].bytes[m] or 0 for n in names) for m in METHODS}
                   for layer, names in LAYERS.items()}
    n_sets = {layer: min(layers[n].copies for n in names) for layer, names in LAYERS.items()}
    rows = []
    for M in batches:
        x_of = {K: torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)  # hidden 3584, then MLP 18944
                for K in sorted({K for _, K in SHAPES.values()})}
        xs = {name: x_of[K] for name, (_, K) in SHAPES.items()}
        avail = []
        for method in methods:
            if any(lay.fn(method, 0) is None for lay in layers.values()):
                continue  # unavailable: the note says why
            try:
                errs = {name: lay.check(method, xs[name]) for name, lay in layers.items()}
                worst = max(errs, key=errs.get)
                if errs[worst] > BASELINE_NOTE:
                    notes[f"{method} M={M}"] = (f"relative error {errs[worst]:.2e} on {worst} "
                                                f"(> {BASELINE_NOTE:.0e}), timed")
            except Exception as e:  # noqa: BLE001 - a baseline that fails or computes something else is reported
                if method in OURS:
                    raise
                notes[f"{method} M={M}"] = f"{type(e).__name__}: {e}"[:200]
                continue
            avail.append(method)
        alone = {}  # cuda µs per GEMV of this round
        for name in list(SHAPES) + list(LAYERS):
            row = {"M": M, "op": name}
            if name in LAYERS:
                row["N_x_K"] = f"{len(LAYERS[name])} GEMVs"
                nbytes, R = layer_bytes[name], n_sets[name]
            else:
                lay = layers[name]
                row["N_x_K"] = f"{lay.N}x{lay.K}"
                nbytes, R = lay.bytes, lay.copies
            for method in avail:
                if name in LAYERS:
                    calls = [(lambda f=layers[n].fn(method, r), a=xs[n]: f(a)) for r in range(R) for n in LAYERS[name]]
                else:
                    calls = [(lambda f=layers[name].fn(method, r), a=xs[name]: f(a)) for r in range(R)]
                us = _graph_us(calls, iters) / R
                row[f"{method}_us"] = us
                row[f"{method}_TBps"] = nbytes[method] / (us * 1e-6) / 1e12
            row["floor4_us"] = nbytes["cuda"] / (copy_tbps * 1e12) * 1e6
            row["floor16_us"] = nbytes["bf16"] / (copy_tbps * 1e12) * 1e6
            if "gemv_us" in row:
                row["gemv_over_floor16"] = row["gemv_us"] / row["floor16_us"]
                if "bf16_us" in row:
                    row["gemv_vs_bf16"] = row["bf16_us"] / row["gemv_us"]
            if "cuda_us" in row:
                row["cuda_over_floor"] = row["cuda_us"] / row["floor4_us"]
                if name in LAYERS:  # the layer against its GEMVs, each timed alone in this round
                    row["cuda_parts_us"] = sum(alone[n] for n in LAYERS[name])
                    row["cuda_layer_over_parts"] = row["cuda_us"] / row["cuda_parts_us"]
                else:
                    alone[name] = row["cuda_us"]
                for base in ("bf16", "tinygemm", "gemlite", "triton"):
                    if f"{base}_us" in row:
                        row[f"cuda_vs_{base}"] = row[f"{base}_us"] / row["cuda_us"]
            rows.append(row)
            print(row, flush=True)
    return rows, notes, copy_tbps


def sweep(batches, iters: int, shapes=None, device: str = "cuda", timer=None, backend: str = "triton",
          op: str = "w4a16_linear") -> list:
    """Every config of our ``backend``'s kernel of ``op`` (``w4a16_linear`` or ``gemv``), its declared space per
    shape (``autotune.measure``: the default first, each config verified against the reference, then timed in a
    CUDA graph over R weight copies). ``shapes`` maps a name to (N, K) or (N, K, glu) (default: ``SHAPES`` for
    ``w4a16_linear``, ``FUSED`` for ``gemv``); ``device`` and ``timer`` let a test run it small under the
    interpreter (one weight set)."""
    from sparsevila_ops import autotune
    from sparsevila_ops.autotune.tuner import cuda_timer
    timer = timer or functools.partial(cuda_timer, iters=iters)
    rows = []
    for name, (N, K, *glu) in (shapes or (FUSED if op == "gemv" else SHAPES)).items():
        glu = bool(glu and glu[0])
        for M in batches:
            shape = {"M": M, "N": N, "K": K, "glu": glu, **({"group": GROUP} if op == "w4a16_linear" else {})}
            args = autotune.make_args(op, shape, device)
            weights = args[1:4] if op == "w4a16_linear" else args[1:2]  # qweight, scales, zeros; or W
            nbytes = sum(t.numel() * t.element_size() for t in weights)
            default = autotune.default_config(op, *args, backend=backend)
            sets = _copies(nbytes) if device == "cuda" else 1
            for t in autotune.measure(op, args, timer=timer, sets=sets, backend=backend):
                if t.status != "ok":  # a config that cannot compile, run or verify is reported, not fatal
                    print(f"skip {name} M={M} {t.config}: {t.status} {t.note}"[:300], flush=True)
                    continue
                us = 1e3 * t.ms
                rows.append({"op": name, "M": M, "glu": glu, **t.config, "heuristic": t.config == default, "us": us,
                             "TBps": nbytes / (us * 1e-6) / 1e12})
                print(rows[-1], flush=True)
            del args
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _plot(rows, copy_tbps):
    styles = {"layer": ("-", "o", "fused, 4 GEMVs"), "layer_unfused": (":", "s", "per module, 7 GEMVs")}

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for layer, (ls, marker, what) in styles.items():
            lr = sorted((r for r in rows if r["op"] == layer), key=lambda r: r["M"])  # rounds: a batch repeats
            Ms = [r["M"] for r in lr]
            for m in METHODS:
                if any(f"{m}_TBps" in r for r in lr):
                    ax1.plot(Ms, [r.get(f"{m}_TBps", math.nan) for r in lr], ls=ls, marker=marker,
                             label=f"{m} ({what})")
                    ax2.plot(Ms, [r.get(f"{m}_us", math.nan) for r in lr], ls=ls, marker=marker,
                             label=f"{m} ({what})")
            ax2.plot(Ms, [r["floor4_us"] for r in lr], color="gray", ls="--" if layer == "layer" else "-.",
                     label=f"4-bit byte floor ({what})")
        ax1.axhline(copy_tbps, color="gray", ls="--", label=f"copy {copy_tbps:.2f} TB/s")
        ax1.set_xlabel("batch M")
        ax1.set_ylabel("effective TB/s (own weight bytes)")
        ax1.set_title("one decoder layer", fontsize=9)
        ax1.legend(fontsize=6)
        ax2.set_xlabel("batch M")
        ax2.set_ylabel("µs per layer")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=6)
    return plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemv4", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, fewer iterations")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1..8)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="the methods to time (default all)")
    p.add_argument("--name", default="gemv4", help="result file name (default gemv4)")
    p.add_argument("--sweep", action="store_true", help="time our kernel's config space (default batch 1)")
    p.add_argument("--backend", choices=OURS, default="cuda", help="the kernel --sweep times (default cuda)")
    p.add_argument("--op", choices=("w4a16_linear", "gemv"), default="w4a16_linear",
                   help="the op --sweep times (default w4a16_linear; gemv: the dense GEMV on the fused layer)")
    p.add_argument("--fused", action="store_true", help="--sweep only the fused layer's shapes (gemv always does)")
    a = p.parse_args(argv)
    for M in a.batches or ():
        if not 1 <= M <= 16:
            p.error(f"--batches must lie in [1, 16] (the kernel's rows); got {M}")
    if not require_gpu("bench.gemv4"):
        return 0
    iters = 20 if a.quick else 50
    if a.sweep:
        rows = sweep(a.batches or [1], iters, shapes=FUSED if a.fused else None, backend=a.backend, op=a.op)
        fields = [f for r in rows for f in r if f not in ("op", "M", "heuristic", "us", "TBps")]
        what = "W4A16 GEMV" if a.op == "w4a16_linear" else "Dense GEMV"
        write_results(f"gemv4_sweep_{a.backend}" if a.op == "w4a16_linear" else f"gemv_sweep_{a.backend}", rows,
                      ["op", "M", *dict.fromkeys(fields), "heuristic", "us", "TBps"],
                      title=f"{what} config sweep ({a.backend} backend), Qwen2.5-7B shapes, bf16")
        return 0
    batches = a.batches or ([1, 8] if a.quick else list(range(1, 9)))
    rows, notes, copy_tbps = run(batches, iters, a.methods or METHODS)
    for r in rows:
        r["copy_TBps"] = copy_tbps
    cols = ["M", "op", "N_x_K"] + [f"{m}_{u}" for m in METHODS for u in ("us", "TBps")] + [
        "floor4_us", "cuda_over_floor", "cuda_parts_us", "cuda_layer_over_parts", "cuda_vs_triton", "cuda_vs_tinygemm",
        "cuda_vs_gemlite", "cuda_vs_bf16", "floor16_us", "gemv_over_floor16", "gemv_vs_bf16"]
    note = "; ".join(f"{k}: {v}" for k, v in notes.items())
    write_results(a.name, rows, cols, plot=_plot(rows, copy_tbps),
                  title=f"Decode GEMVs (W4A16 and dense), Qwen2.5-7B layer, bf16, copy {copy_tbps:.2f} TB/s"
                        + (f" ({note})" if note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
