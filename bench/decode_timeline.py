"""Where the time of one cuda-backend decode goes: per-CTA phase clocks of the cluster kernel.

``python -m bench.decode_timeline [--ctx 8192] [--layers 16]``. Qwen2-7B bf16 shapes, batch 1. R layers (distinct
caches) are captured in one CUDA graph, each with its own timeline buffer, and replayed; for a middle layer
the script prints the median over CTAs of each phase (from %clock64) and, from %globaltimer, the layer's
span (first CTA entry to last CTA exit) and the gap to the next layer's first entry. Phases:

  0→1 entry to after griddepcontrol.wait (with PDL: the wait for the previous layer)
  1→2 lengths + chunk bounds + q tile + first bulk copies issued
  2→3 until the first tile has landed (memory latency)
  3→4 main loop
  4→5 warp merge + remote stores into the cluster inboxes
  5→6 cluster barrier
  6→7 final merge and output stores

The kernel records them when its ``timeline`` argument is not null; the library always passes null, so this file
launches the kernel through the library's host side with the pointer (``decode_with_timeline``:
``sparsevila_ops.cuda_decode._run``).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import replay_in_graph, require_gpu
from sparsevila_ops.cuda_decode import _run

PHASES = ["gdc_wait", "prologue", "first_data", "main_loop", "warp_merge", "cluster_sync", "out"]
TIMELINE_STAMPS = 8  # kTimelineStamps in csrc/decode_cluster.cu


def decode_with_timeline(q, k, v, lengths, scale, out, lse, timeline, cluster, clusters_per_row, warps, pdl):
    """The cuda backend's decode with ``timeline`` int64 ``[B * Hk, cluster * clusters_per_row,
    TIMELINE_STAMPS + 2]``: per CTA the %clock64 of each phase boundary, then %globaltimer at entry and exit."""
    _run(q, k, v, lengths, scale, out, lse, cluster, clusters_per_row, warps, pdl, timeline.data_ptr())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--cluster", type=int, default=16)
    p.add_argument("--clusters-per-row", type=int, default=1)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--pdl", type=int, default=1)
    a = p.parse_args(argv)
    if not require_gpu("bench.decode_timeline"):
        return 0
    B, hq, hk, D, R = 1, 28, 4, 128, a.layers
    dev, dt = "cuda", torch.bfloat16
    qs = [torch.randn(B, hq, D, device=dev, dtype=dt) for _ in range(R)]
    ks = [torch.randn(B, hk, a.ctx + 256, D, device=dev, dtype=dt) for _ in range(R)]
    vs = [torch.randn_like(k) for k in ks]
    lengths = torch.tensor([a.ctx], dtype=torch.int32, device=dev)
    outs = [(torch.empty_like(q), torch.empty(B, hq, device=dev)) for q in qs]
    chunks = a.cluster * a.clusters_per_row
    tl = [torch.zeros(B * hk, chunks, TIMELINE_STAMPS + 2, dtype=torch.int64, device=dev) for _ in range(R)]
    cfg = dict(cluster=a.cluster, clusters_per_row=a.clusters_per_row, warps=a.warps, pdl=bool(a.pdl))

    def step():
        for i in range(R):
            decode_with_timeline(qs[i], ks[i], vs[i], lengths, D ** -0.5, outs[i][0], outs[i][1], tl[i], **cfg)
    replay_in_graph(step)
    ghz = torch.cuda.get_device_properties(0).clock_rate / 1e6 if hasattr(torch.cuda.get_device_properties(0),
                                                                         "clock_rate") else 1.755
    mid = R // 2
    t = tl[mid].view(-1, TIMELINE_STAMPS + 2).cpu()
    print(f"ctx {a.ctx}, {cfg}, layer {mid} of {R}, {t.shape[0]} CTAs, clock {ghz:.3f} GHz")
    for j, name in enumerate(PHASES):
        d = [(int(r[j + 1]) - int(r[j])) / ghz / 1e3 for r in t]
        print(f"  {name:13s} median {statistics.median(d):6.2f} us  min {min(d):6.2f}  max {max(d):6.2f}")
    spans, gaps = [], []
    for i in range(1, R - 1):
        ti = tl[i].view(-1, TIMELINE_STAMPS + 2).cpu()
        tn = tl[i + 1].view(-1, TIMELINE_STAMPS + 2).cpu()
        entry, exit_ = int(ti[:, -2].min()), int(ti[:, -1].max())
        spans.append((exit_ - entry) / 1e3)
        gaps.append((int(tn[:, -2].min()) - exit_) / 1e3)
    print(f"  layer span (first entry to last exit) median {statistics.median(spans):.2f} us; "
          f"gap to next layer's first entry median {statistics.median(gaps):.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
