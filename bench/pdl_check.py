"""Is inductor's programmatic dependent launch safe for the integration's compiled decode step?

``python -m bench.pdl_check [--tokens 24] [--repeats 20]`` (sm90+). With ``triton.enable_pdl``
(``sparsevila_ops.integrations.decode_compile``, the integration's default on sm90+) inductor launches each of its
Triton kernels with the PDL attribute, but emits ``gdc_wait()`` only in a kernel that reads what the scheduler's
previous node writes (or writes what it reads). A PDL kernel that never waits can finish before its predecessor;
a later kernel that waits for its own predecessor only may then read memory an earlier grid is still writing (a
transitive race).

On the tiny random Qwen2.5-VL (``demo.build_model(False)``, bf16, a video, ``enable(model, 0.75, 0.95,
cuda_graph=True)``), inductor's cache in a fresh directory: greedy ``generate`` with the PDL compile config
2 + ``--repeats`` times (the second is the reference), a scan of every Triton kernel inductor wrote, and the
reference again without PDL (transformers' default ``CompileConfig()``). Verdict: safe (exit 0) when some kernel is
launched with PDL and none of them (nor a kernel triggering its dependents) lacks a ``gdc_wait``, the tokens equal those
without PDL, and every repeat gives the reference's tokens (a race shows as nondeterminism); else exit 1. Score
differences are reported. Writes ``pdl_check.{json,md}``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import List, Tuple

import torch

from bench.common import require_gpu, write_results

KERNEL = re.compile(r"^@triton\.jit\s*\n(?=def (\w+)\()", re.M)
LAUNCH_PDL = re.compile(r"""['"]launch_pdl['"]\s*:\s*True""")


def kernels_in(source: str) -> List[dict]:
    """The ``@triton.jit`` kernels of one generated file (a kernel's own file, or the output code holding kernels
    as strings): ``name``, ``body`` (the ``def`` and its indented lines), ``pdl`` (the decorators' ``triton_meta``
    says ``'launch_pdl': True``), ``wait`` / ``launch`` (the body calls ``gdc_wait`` / ``gdc_launch_dependents``)."""
    out, head = [], ""
    for chunk in re.split(r"(?m)^(?=@)", source):
        if not re.search(r"(?m)^def ", chunk):  # a decorator of the next function, or text before one
            head += chunk
            continue
        chunk, head = head + chunk, ""
        m = KERNEL.search(chunk)
        if m is None:
            continue
        first, *rest = chunk[m.end():].split("\n")
        body = "\n".join([first, *itertools.takewhile(lambda line: not line[:1].strip(), rest)]).rstrip()
        out.append({"name": m.group(1), "body": body, "pdl": bool(LAUNCH_PDL.search(chunk[:m.start()])),
                    "wait": "gdc_wait(" in body, "launch": "gdc_launch_dependents(" in body})
    return out


def no_wait(kernel: dict) -> bool:
    """Launched with PDL (or letting its dependents start) without ever waiting for its predecessor."""
    return (kernel["pdl"] or kernel["launch"]) and not kernel["wait"]


def scan_kernels(cache_dir: str) -> dict:
    """The distinct kernels in ``*.py`` under ``cache_dir`` (a kernel in its own file and in the output code counts
    once): how many, how many launched with PDL, and the names of those without a wait (``no_wait``)."""
    found = {}
    for path in sorted(Path(cache_dir).rglob("*.py")):
        for k in kernels_in(path.read_text(errors="replace")):
            found.setdefault((k["name"], k["body"]), k)
    ks = list(found.values())
    names = sorted({k["name"] for k in ks if no_wait(k)})
    return {"kernels": len(ks), "pdl": sum(k["pdl"] for k in ks), "no_wait": names}


def score_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b|, entries equal in both (the -inf of masked tokens too) counting 0."""
    return float(torch.where(a == b, 0.0, (a - b).abs()).max())


class _Scores:
    """A logits processor keeping each step's scores. Not ``return_dict_in_generate``: a cache handed back to the
    caller is never reused, so each call would capture new graphs on new buffers."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.float().clone())
        return scores


def generate_runs(model, inputs: dict, n: int, tokens: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``n`` greedy ``generate`` calls of ``tokens`` new tokens: (new ids, scores [tokens, vocab])."""
    from transformers import LogitsProcessorList

    out = []
    for _ in range(n):
        rec = _Scores()
        ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([rec]))
        out.append((ids[:, -tokens:], torch.cat(rec.seen)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pdl_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24, help="new tokens per generate")
    p.add_argument("--repeats", type=int, default=20, help="PDL generates compared with the reference")
    a = p.parse_args(argv)
    if a.tokens < 2 or a.repeats < 1:
        p.error(f"--tokens must be >= 2 and --repeats >= 1; got {a.tokens}, {a.repeats}")
    if not require_gpu("bench.pdl_check"):
        return 0
    if torch.cuda.get_device_capability()[0] < 9:
        print("bench.pdl_check: inductor emits PDL on sm90+ only; skipped")
        return 0
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdl_check_inductor_")  # before compiles

    from transformers import CompileConfig
    from sparsevila_ops.integrations.decode_compile import decode_compile_config
    from sparsevila_ops.integrations import qwen2_5_vl as sv
    from sparsevila_ops.integrations.demo import build_model, reset_compiled, video_inputs

    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = build_model(False, dev, dtype)
    inputs = video_inputs(model, 4, 12, 12, 16, dev, dtype)

    def runs(config, n):
        model.generation_config.compile_config = config
        sv.enable(model, 0.75, 0.95, cuda_graph=True)
        try:
            return generate_runs(model, inputs, n, a.tokens)
        finally:
            sv.disable(model)
            reset_compiled(model)

    pdl = runs(decode_compile_config(dev), 2 + a.repeats)
    scan = scan_kernels(cache)  # before the default config compiles its own kernels into the same directory
    base = runs(CompileConfig(), 2)[1]  # transformers' default: no PDL
    (ids, scores), same = pdl[1], [torch.equal(i, pdl[1][0]) for i, _ in pdl[2:]]
    rows = [{"check": "inductor kernels launched with PDL", "value": f"{scan['pdl']} of {scan['kernels']}",
             "ok": scan["pdl"] > 0},
            {"check": "PDL kernels without gdc_wait", "value": len(scan["no_wait"]), "ok": not scan["no_wait"],
             "kernels": scan["no_wait"]},
            {"check": "tokens with PDL == without", "value": f"{int((ids == base[0]).sum())}/{ids.numel()} equal",
             "ok": torch.equal(ids, base[0])},
            {"check": "max |score diff|, PDL vs without", "value": score_diff(scores, base[1]), "ok": None},
            {"check": "PDL repeats with the reference's tokens", "value": f"{sum(same)}/{len(same)}", "ok": all(same)},
            {"check": "max |score diff|, PDL repeats vs reference",
             "value": max(score_diff(s, scores) for _, s in pdl[2:]), "ok": None}]
    for name in scan["no_wait"]:
        print(f"  no gdc_wait: {name}")
    safe = all(r["ok"] is not False for r in rows)
    write_results("pdl_check", rows, ["check", "value", "ok"],
                  title=f"inductor PDL on the compiled decode step ({a.tokens} tokens, kernels in {cache}): "
                        f"{'safe' if safe else 'NOT SAFE'}")
    return 0 if safe else 1


if __name__ == "__main__":
    raise SystemExit(main())
