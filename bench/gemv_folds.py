"""``gemv``'s folds (``norm_weight``: an RMSNorm; ``residual``: a residual add) against the kernels they replace.

``python -m bench.gemv_folds``. Qwen2.5-7B's decoder layer at batch 1, bf16, 28 layers (distinct random weights)
captured in one CUDA graph per variant, median of 20 replays, reported per layer:

- ``layer`` rows: the layer's linear part four ways: the four GEMVs alone (the floor of the comparison), with the
  two RMSNorms and residual adds as eager torch ops (``w * round(x * rsqrt(mean(x^2) + eps))``, as the model's
  RMSNorm computes it), with them compiled by inductor (one kernel per add + norm), and folded into the GEMVs
  (q/k/v and gate/up normalized, o and down + residual).
- ``launch`` rows: each GEMV plain and with its fold, at its looked-up config and at other CTA shapes (the norm fold
  stages x * g once per CTA: fewer, larger CTAs stage less).

Every folded output is checked against the reference backend first. What it measured on the H200 is in
``bench/NOTES.md`` ("RMSNorms and residual adds folded into the decode GEMVs").
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import require_gpu, time_cuda, verify, write_results

H, I, QKV = 3584, 18944, 4608  # Qwen2.5-7B: hidden, MLP intermediate, fused q/k/v rows
LAYERS = 28
EPS = 1e-6
OTHER_CONFIGS = [{"rows": r, "warps": w, "kwarps": k} for r, w, k in ((2, 4, 1), (4, 4, 1), (4, 8, 1), (4, 8, 2))]


def _weights(gen, layers=LAYERS, hidden=H, inter=I, qkv=QKV, device="cuda"):
    """Per layer: fused q/k/v weight and bias, o, fused gate/up, down (std 0.02), RMSNorm weights around 1."""
    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, generator=gen)).to(torch.bfloat16)
    return [{"qkv": rn(qkv, hidden, scale=0.02), "b": rn(qkv), "o": rn(hidden, hidden, scale=0.02),
             "gu": rn(2 * inter, hidden, scale=0.02), "down": rn(hidden, inter, scale=0.02),
             "n1": 1 + 0.3 * rn(hidden), "n2": 1 + 0.3 * rn(hidden)} for _ in range(layers)]


def _rms(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _layer_variants(so):
    """name -> f(weights of a layer, x [1, H], attention output a [1, H]) -> the layer's output [1, H]."""
    def gemvs(w, x, a):
        so.gemv(x, w["qkv"], w["b"])
        m = so.gemv(so.gemv(a, w["o"]), w["gu"], glu=True)
        return so.gemv(m, w["down"])

    def unfolded(w, x, a):
        so.gemv(_rms(x, w["n1"]), w["qkv"], w["b"])
        h = x + so.gemv(a, w["o"])
        return h + so.gemv(so.gemv(_rms(h, w["n2"]), w["gu"], glu=True), w["down"])

    def add_norm(x, y, g):
        h = x + y
        return h, _rms(h, g)

    compiled_add_norm, compiled_rms = torch.compile(add_norm, dynamic=False), torch.compile(_rms, dynamic=False)

    def compiled(w, x, a):
        so.gemv(compiled_rms(x, w["n1"]), w["qkv"], w["b"])
        h, hn = compiled_add_norm(x, so.gemv(a, w["o"]), w["n2"])
        return h + so.gemv(so.gemv(hn, w["gu"], glu=True), w["down"])

    def folded(w, x, a):
        so.gemv(x, w["qkv"], w["b"], norm_weight=w["n1"], eps=EPS)
        h = so.gemv(a, w["o"], residual=x)
        return so.gemv(so.gemv(h, w["gu"], glu=True, norm_weight=w["n2"], eps=EPS), w["down"], residual=h)

    return {"four GEMVs alone": gemvs, "eager norms and adds": unfolded, "inductor norms and adds": compiled,
            "folded": folded}


def _per_layer_us(step) -> float:
    """Median over 20 replays of one CUDA graph of ``step`` (28 layers), in µs per layer."""
    return time_cuda(lambda _: step(), iters=20, graph=True)["median_ms"] * 1000 / LAYERS


def _check(so, ws, x, a) -> None:
    """The folded launches against the reference backend (one layer)."""
    from sparsevila_ops import reference
    w = ws[0]
    for name, args, kw in (("qkv+norm", (x, w["qkv"], w["b"]), {"norm_weight": w["n1"]}),
                           ("o+residual", (a, w["o"]), {"residual": x}),
                           ("gate_up+norm", (x, w["gu"]), {"glu": True, "norm_weight": w["n2"]})):
        out = so.gemv(*args, eps=EPS, **kw)
        ref = torch.empty_like(out)
        reference.gemv(args[0], args[1], args[2] if len(args) > 2 else None, kw.get("glu", False),
                       kw.get("norm_weight"), EPS, kw.get("residual"), ref)
        verify(name, out, ref, 2e-2)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not require_gpu("bench.gemv_folds"):
        return 0
    import sparsevila_ops as so
    from sparsevila_ops import cuda_gemv
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = _weights(gen)
    x = torch.randn(1, H, device="cuda", generator=gen).to(torch.bfloat16)
    a = torch.randn(1, H, device="cuda", generator=gen).to(torch.bfloat16)
    _check(so, ws, x, a)
    rows = []
    for name, fn in _layer_variants(so).items():
        rows.append({"kind": "layer", "what": name, "config": "looked up",
                     "us": _per_layer_us(lambda: [fn(w, x, a) for w in ws])})
    m = torch.randn(1, I, device="cuda", generator=gen).to(torch.bfloat16)
    launches = (("qkv", "norm", x, "qkv", "b", False, "n1"), ("o", "residual", a, "o", None, False, None),
                ("gate_up", "norm", x, "gu", None, True, "n2"), ("down", "residual", m, "down", None, False, None))
    for name, fold, inp, wk, bk, glu, nk in launches:
        out = torch.empty(1, ws[0][wk].shape[0] // (2 if glu else 1), dtype=torch.bfloat16, device="cuda")
        looked_up = cuda_gemv.GEMV_CUDA.config((inp, ws[0][wk], ws[0].get(bk), glu, out))
        for cfg in [looked_up] + [c for c in OTHER_CONFIGS if c != looked_up]:
            for folded in (False, True):
                def step(cfg=cfg, folded=folded):
                    for w in ws:
                        folds = None
                        if folded:
                            folds = (w[nk], EPS, None) if fold == "norm" else (None, EPS, x)
                        cuda_gemv._launch(inp, w[wk], w.get(bk), glu, out, cfg, folds)
                rows.append({"kind": "launch", "what": f"{name}{' + ' + fold if folded else ''}",
                             "config": "looked up" if cfg is looked_up else str(cfg), "us": _per_layer_us(step)})
    write_results("gemv_folds", rows, ["kind", "what", "config", "us"],
                  title="gemv folds: Qwen2.5-7B decode layer, batch 1, bf16, µs per layer (28 in one CUDA graph)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
