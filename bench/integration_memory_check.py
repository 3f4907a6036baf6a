"""GPU memory across repeated ``generate`` calls with the graph-captured decode (``enable(..., cuda_graph=True)``).

``python -m bench.integration_memory_check [--model tiny|7b] [--calls 3] [--new-tokens 64] [--snapshot DIR]
[--settings P,D ...]``

On the H200 the 7B config at sparsities (0.75, 0.95) ran out of GPU memory on the third ``generate`` of a
128k-token video: called outside ``torch.no_grad``, the pruning's encoder forward recorded an autograd graph that
the salience kept on the model's state held alive (~60 GB of vision activations per call; now ``generate`` runs
under ``no_grad`` as transformers' does). The calls here run outside ``no_grad`` too. For each setting, (0, 0),
(0.75, 0.95), (0, 0.95) and (0.75, 0) (pruning and packed decode apart), it prints the allocated and reserved GB
after every call, the allocated GB after the last one's compiled state is reset, and the graphs compiled so far;
``--snapshot DIR`` also dumps ``torch.cuda.memory`` snapshots (pickles for pytorch.org/memory_viz).
``TORCH_LOGS=cudagraphs,perf_hints`` shows cudagraph re-recordings and skips. Exit status 1 when a setting
grows by more than 1 GB between its second and last call.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch._dynamo.utils import counters

from bench.common import require_gpu

SETTINGS = ((0.0, 0.0), (0.75, 0.95), (0.0, 0.95), (0.75, 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.integration_memory_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "7b"], default="7b")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--snapshot", default=None, help="write a memory snapshot per setting into this folder")
    p.add_argument("--settings", nargs="+", default=None, metavar="P,D",
                   help="sparsity pairs to run (default: " + " ".join(f"{x},{y}" for x, y in SETTINGS) + ")")
    a = p.parse_args(argv)
    try:
        settings = [tuple(float(x) for x in s.split(",")) for s in a.settings] if a.settings else SETTINGS
    except ValueError:
        p.error(f"--settings takes pairs P,D of floats; got {a.settings}")
    if any(len(s) != 2 for s in settings):
        p.error(f"--settings takes pairs P,D; got {a.settings}")
    if a.calls < 2:
        p.error(f"--calls must be >= 2; got {a.calls}")
    if not require_gpu("integration_memory_check"):
        return 0
    from sparsevila_ops.integrations import qwen2_5_vl as sv
    from sparsevila_ops.integrations.demo import build_model, reset_compiled, video_inputs

    full = a.model == "7b"
    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = build_model(full, dev, dtype)
    inputs = video_inputs(model, *((32, 28, 28, 64) if full else (4, 12, 12, 8)), dev, dtype)
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
    gb = lambda: torch.cuda.memory_allocated() / 2 ** 30  # noqa: E731
    grew = []
    for ps, ds in settings:
        if a.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        sv.enable(model, ps, ds, cuda_graph=True)
        used, reserved = [], []
        try:
            for _ in range(a.calls):  # outside no_grad, as a user may call generate
                model.generate(**inputs, **gen)
                torch.cuda.synchronize()
                used.append(gb())
                reserved.append(torch.cuda.memory_reserved() / 2 ** 30)
        finally:
            sv.disable(model)
        if a.snapshot:
            os.makedirs(a.snapshot, exist_ok=True)
            torch.cuda.memory._dump_snapshot(os.path.join(a.snapshot, f"memory_{ps}_{ds}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        reset_compiled(model)
        after = gb()
        print(f"({ps}, {ds}): allocated GB after each call " + " ".join(f"{u:.2f}" for u in used)
              + "; reserved " + " ".join(f"{u:.2f}" for u in reserved) + f"; after reset {after:.2f}; graphs "
              f"compiled so far {counters['stats']['unique_graphs']}", flush=True)
        if used[-1] - used[1] > 1.0:
            grew.append((ps, ds))
    print("memory grows across calls at " + (", ".join(map(str, grew)) if grew else "no setting"))
    return 1 if grew else 0


if __name__ == "__main__":
    raise SystemExit(main())
