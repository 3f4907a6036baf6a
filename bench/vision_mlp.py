"""The Qwen2.5-VL-7B vision blocks' MLP at 128k visual tokens (524,288 patches), bf16: stock (gate, up, down over
the 3420-wide intermediate) vs fused and padded (``integrations.fused``: one GEMM for gate/up over 2 x 3456 rows,
down over 3456 columns, zero padding). e2e's encoder profile found the stock GEMMs running as Ampere cuBLAS kernels
at ~35 % of peak (3420 x 2 bytes is not a multiple of 16); the padded sizes are.

``python -m bench.vision_mlp [--patches N]``. Rows: each variant's time per MLP call, its GEMM TFLOP/s
(3 x 2 N 1280 3420 FLOP, the useful work), and the 32-block total per encoder forward.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from torch import nn

from bench.common import require_gpu, time_cuda, verify, write_results

HIDDEN, INTERMEDIATE, BLOCKS = 1280, 3420, 32  # Qwen2.5-VL-7B vision config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=524288, help="rows of the MLP input (default: 128k tokens x 4)")
    args = p.parse_args(argv)
    if not require_gpu("bench.vision_mlp"):
        return 0
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
    from sparsevila_ops.integrations import fused

    torch.manual_seed(0)
    cfg = SimpleNamespace(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")
    block = nn.Module()
    block.mlp = Qwen2_5_VLMLP(cfg, bias=True).to("cuda", torch.bfloat16)
    x = torch.randn(args.patches, HIDDEN, device="cuda", dtype=torch.bfloat16)
    flop = 3 * 2 * args.patches * HIDDEN * INTERMEDIATE
    rows = []
    with torch.no_grad():
        ref = block.mlp(x).float()
        for name in ("stock (3 GEMMs, intermediate 3420)", "fused gate/up, padded to 3456"):
            if name.startswith("fused"):
                assert fused.fuse([block]) == ["0.mlp"]
                verify(name, block.mlp(x).float(), ref, 1e-2)
            t = time_cuda(lambda i: block.mlp(x), warmup=3, iters=10)
            rows.append({"variant": name, "patches": args.patches, "median_ms": t["median_ms"],
                         "TFLOP_s": flop / (t["median_ms"] * 1e-3) / 1e12,
                         "per_encoder_ms": BLOCKS * t["median_ms"]})
    rows[1]["speedup"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    write_results("vision_mlp", rows, ["variant", "patches", "median_ms", "TFLOP_s", "per_encoder_ms", "speedup"],
                  title="Qwen2.5-VL-7B vision MLP, bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
