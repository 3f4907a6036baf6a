"""Shape presets for ``tune --shapes``: the benchmark shapes and the model shapes the shipped tables cover.

Each preset is a list of ``(op, shape)``; shapes are partial (``problems.PROBLEMS[op].defaults`` fills the rest).
Models: SigLIP (16 heads x 72, 729 tokens per frame), the Qwen2.5-VL vision tower (16 x 80; windows of 64
tokens and whole frames), Qwen2-7B (28 / 4 x 128, also the LLM of Qwen2.5-VL-7B) and Llama-2-7B (32 / 32 x 128),
contexts 8k-128k, and their W4A16 linear layers (group 128) at decode batches 1-8. A ``--shapes`` file is a JSON
list of ``{"op": OP, <shape fields>}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

Shape = Tuple[str, dict]
CONTEXTS = (8192, 32768, 131072)
DECODE_SLACK = 256  # capacity left for generated tokens (bench/decode.py)


def _salience(H: int, D: int, segments) -> List[Shape]:
    """Per (segment length, segments): the Triton backend's two passes (the column-sum pass given an LSE), and the
    whole op (the cuda backend's launcher) with two passes and with the LSE given."""
    shapes = [(op, {"H": H, "D": D, "n": n, "segs": segs}) for n, segs in segments
              for op in ("visual_salience.lse", "visual_salience.colsum")]
    return shapes + [("visual_salience", {"H": H, "D": D, "n": n, "segs": segs, "lse_given": given})
                     for n, segs in segments for given in (False, True)]


def _llm(Hq: int, Hk: int, L: int, prefill: Tuple[int, ...], contexts: Tuple[int, ...]) -> List[Shape]:
    """A decoder: causal prefill, relevance of 64-512 question rows, select + pack of all layers (5 and 30 %
    kept), decode over full and 5 %-packed caches, gather decode of 5 and 30 %, append (also fused with RoPE)."""
    llm = {"Hq": Hq, "Hk": Hk, "D": 128}
    out: List[Shape] = [("prefill_attention", {**llm, "n": n}) for n in prefill]
    out += [("kv_relevance", {**llm, "rows": m, "n": n}) for n in contexts for m in (64, 256, 512)]
    for n in contexts:
        out += [("select_kv", {"L": L, "Hk": Hk, "n": n})]
        out += [("pack_kv", {"L": L, "Hk": Hk, "n": n, "keep": keep}) for keep in (0.05, 0.3)]
        out += [("decode_attention", {**llm, "n": m}) for m in (n, max(1, n // 20))]
        out += [("sparse_decode_attention", {**llm, "T": n, "n": max(1, n // 20)}),
                ("sparse_decode_attention", {**llm, "T": n, "n": n * 3 // 10})]
    out += [("append_kv", {"Hk": Hk, "D": 128, "cap": n + DECODE_SLACK}) for n in contexts]
    out += [("rope_append_kv", {"Hq": Hq, "Hk": Hk, "D": 128, "cap": n + DECODE_SLACK}) for n in contexts]
    return out


def _w4_linears(hidden: int, q: int, kv: int, intermediate: int) -> List[Shape]:
    """A decoder's W4A16 GEMVs (N x K) at decode batches 1-8: the fused qkv and gate_up of bench/gemv4.py (gate_up
    also emitting silu(gate) * up: glu), and the per-module layers ``quantize_model_linears`` makes of a
    transformers model (q, k / v, o, gate / up, down)."""
    nk = ((q + 2 * kv, hidden), (q, hidden), (kv, hidden), (hidden, q), (2 * intermediate, hidden),
          (intermediate, hidden), (hidden, intermediate))
    return ([("w4a16_linear", {"M": m, "N": n, "K": k}) for n, k in dict.fromkeys(nk) for m in range(1, 9)]
            + [("w4a16_linear", {"M": m, "N": intermediate, "K": hidden, "glu": True}) for m in range(1, 9)])


def _gemvs(hidden: int, q: int, kv: int, intermediate: int, batches=range(1, 9)) -> List[Shape]:
    """A decoder's dense GEMVs (N x K) as the integration runs them at decode batches: fused qkv (with bias: Qwen2's),
    o, the fused gate/up emitting silu(gate) * up (glu), down."""
    return [("gemv", {"M": m, "N": n, "K": k, "glu": glu, "bias": bias}) for m in batches
            for n, k, glu, bias in ((q + 2 * kv, hidden, False, True), (hidden, q, False, False),
                                    (intermediate, hidden, True, False), (hidden, intermediate, False, False))]


QWEN2_W4 = _w4_linears(3584, 3584, 512, 18944)  # Qwen2-7B = Qwen2.5-7B
LLAMA2_W4 = _w4_linears(4096, 4096, 4096, 11008)
SIGLIP = _salience(16, 72, [(729, 16), (729, 64), (729, 256)])
QWEN2_5_VL_VISION = (_salience(16, 80, [(64, 256), (784, 16), (4096, 1), (16384, 1), (32768, 1)])
                     + [("prefill_attention", {"Hq": 16, "Hk": 16, "D": 80, "n": n, "segs": segs, "causal": False})
                        for n, segs in ((64, 256), (64, 1024), (784, 16), (4096, 1))])
QWEN2 = _llm(28, 4, 28, (8192, 16384, 32768), CONTEXTS) + QWEN2_W4 + _gemvs(3584, 3584, 512, 18944)
LLAMA2 = _llm(32, 32, 32, (4096, 8192), (8192, 32768)) + LLAMA2_W4
BENCH = (_salience(16, 72, [(729, 64), (729, 256)]) + _salience(16, 80, [(4096, 1), (16384, 1), (32768, 1), (64, 256)])
         + [("prefill_attention", {"Hq": hq, "Hk": hk, "D": 128, "n": n})
            for hq, hk in ((28, 4), (32, 32)) for n in (8192, 16384, 32768)]
         + [("kv_relevance", {"Hq": hq, "Hk": hk, "D": 128, "rows": m, "n": n})
            for hq, hk in ((28, 4), (32, 32)) for n in CONTEXTS for m in (64, 128, 256, 512)]
         + [("select_kv", {"L": L, "Hk": hk, "n": n}) for L, hk, ns in ((28, 4, CONTEXTS), (32, 32, CONTEXTS[:2]))
            for n in ns]
         + [("pack_kv", {"L": L, "Hk": hk, "n": n, "keep": keep})
            for L, hk, ns in ((28, 4, CONTEXTS), (32, 32, CONTEXTS[:2])) for n in ns for keep in (0.05, 0.15, 0.3)]
         + [("decode_attention", {"Hq": hq, "Hk": hk, "n": round(p * n)})
            for hq, hk in ((28, 4), (32, 32)) for n in CONTEXTS for p in (1.0, 0.05, 0.15, 0.3)]
         + [("sparse_decode_attention", {"Hq": hq, "Hk": hk, "T": n, "n": round(0.05 * n)})
            for hq, hk in ((28, 4), (32, 32)) for n in CONTEXTS]
         + [("w4a16_linear", {"M": m, "N": n, "K": k})  # bench/gemv4.py: one Qwen2.5-7B layer, fused qkv / gate_up
            for n, k in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)) for m in range(1, 9)])



def _keep(n: int, sparsity: float) -> int:
    return n if sparsity == 0 else max(1, round((1.0 - sparsity) * n))


def _qwen2_5_vl_e2e(visual=(16384, 131072), text: int = 78, steps: int = 256) -> List[Shape]:
    """What bench/e2e.py runs on Qwen2.5-VL-7B: videos of 32 x 32 patches per frame (frames = visual / 128),
    ``text`` prompt tokens beside the video, rows at sparsities (0, 0), (0.75, 0.95), (0.70, 0.85), (0.90, 0):
    the vision tower's window (64 tokens) and full (1024 per 2 frames) attention and salience, the LLM's prefill,
    relevance of the 64-token question, select + pack, decode over full and packed caches, append; its W4A16
    linears (fused qkv and gate / up as the integration runs them, and per module) and dense GEMVs at batch 1."""
    out: List[Shape] = []
    llm = {"Hq": 28, "Hk": 4, "D": 128}
    vis = {"Hq": 16, "Hk": 16, "D": 80, "causal": False}
    for v in visual:
        groups = v // 256  # 2-frame groups of 32 x 32 patches
        out += [("prefill_attention", {**vis, "n": 64, "segs": 16 * groups}),
                ("prefill_attention", {**vis, "n": 1024, "segs": groups})]
        out += _salience(16, 80, [(1024, groups)])
        for ps, ds in ((0.0, 0.0), (0.75, 0.95), (0.70, 0.85), (0.90, 0.0)):
            n = _keep(v, ps) + text
            out += [("prefill_attention", {**llm, "n": n}), ("kv_relevance", {**llm, "rows": 64, "n": n}),
                    ("append_kv", {"Hk": 4, "D": 128, "cap": n + steps}),
                    ("rope_append_kv", {"Hq": 28, "Hk": 4, "D": 128, "cap": n + steps})]
            if ds:
                out += [("select_kv", {"L": 28, "Hk": 4, "n": n}),
                        ("pack_kv", {"L": 28, "Hk": 4, "n": n, "keep": 1.0 - ds})]
            out += [("decode_attention", {**llm, "n": _keep(_keep(v, ps), ds) + text + steps // 2})]
    nk = ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (512, 3584), (18944, 3584))  # fused, per module
    return (out + [("w4a16_linear", {"M": 1, "N": n, "K": k}) for n, k in nk]
            + [("w4a16_linear", {"M": 1, "N": 18944, "K": 3584, "glu": True})] + _gemvs(3584, 3584, 512, 18944, (1,)))


QWEN2_5_VL_E2E = _qwen2_5_vl_e2e()
PRESETS: Dict[str, List[Shape]] = {
    "bench": BENCH, "siglip": SIGLIP, "qwen2_5_vl": QWEN2_5_VL_VISION + QWEN2, "qwen2": QWEN2, "llama2": LLAMA2,
    "qwen2_5_vl_e2e": QWEN2_5_VL_E2E,
}
PRESETS["all"] = [s for name in ("bench", "siglip", "qwen2_5_vl", "llama2", "qwen2_5_vl_e2e") for s in PRESETS[name]]


def load(spec: str) -> List[Shape]:
    """A preset name, or a JSON file: a list of ``{"op": OP, <shape fields>}``."""
    if spec in PRESETS:
        return list(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--shapes must be a preset ({', '.join(PRESETS)}) or a JSON file; got {spec!r}")
    items = json.loads(path.read_text())
    if not isinstance(items, list) or not all(isinstance(i, dict) and "op" in i for i in items):
        raise ValueError(f"{spec}: expected a JSON list of objects with an \"op\" field")
    return [(i["op"], {k: v for k, v in i.items() if k != "op"}) for i in items]
