"""CUDA-graph decode of the Qwen2.5-VL integration vs eager, on a tiny random model, several caches in a row.

``python -m bench.integration_graph_check [--mode reduce-overhead|default] [--dtype float32|bfloat16]``
For each (prefill, decode) sparsity it runs ``generate`` eagerly and with a compiled decode step (HF's
``compile_config``), then checks: same tokens, and every packed row equals the ordered gather of the full
cache. One model is compiled for every setting in turn, as a user's process would.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main(argv=None) -> int:
    from qwen_tiny import tiny_model, visual_inputs
    from transformers.generation.configuration_utils import CompileConfig

    from bench.common import require_gpu

    import sparsevila_ops.integrations.qwen2_5_vl as sv
    from sparsevila_ops.integrations.cache import packed_mismatch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="reduce-overhead", choices=["reduce-overhead", "default"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args(argv)
    if not require_gpu("integration_graph_check"):
        return 0
    dtype = getattr(torch, a.dtype)
    model = tiny_model(device="cuda", dtype=dtype)
    cc = CompileConfig(fullgraph=True, mode=None if a.mode == "default" else a.mode)
    bad = 0
    for ps, ds in [(0.5, 0.0), (0.0, 0.9), (0.5, 0.9), (0.0, 0.9)]:
        runs = {}
        for graph in (False, True):
            sv.enable(model, ps, ds, cuda_graph=graph)
            try:
                with torch.no_grad():
                    runs[graph] = model.generate(**visual_inputs(seed=9, device="cuda", dtype=dtype), max_new_tokens=6,
                                                 do_sample=False, return_dict_in_generate=True, compile_config=cc)
            finally:
                sv.disable(model)
        same = torch.equal(runs[False].sequences, runs[True].sequences)
        mism = packed_mismatch(runs[True].past_key_values) if ds > 0 else ""
        bad += (not same) + bool(mism)
        print(f"mode={a.mode} pdl={os.environ.get('SPARSEVILA_PDL', '1')} {a.dtype} ({ps}, {ds}): tokens "
              f"{'equal' if same else 'DIFFER'}; packed {'MISMATCH: ' + mism if mism else 'ok'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
