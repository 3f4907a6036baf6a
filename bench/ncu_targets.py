r"""The kernels that miss their performance targets (bench/NOTES.md), one launch each, for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section Occupancy python -m bench.ncu_targets

Every op is run once to JIT-compile, then once between ``cudaProfilerStart/Stop`` (the launches ncu
profiles): salience (SigLIP 64 frames, both passes, the default backend: cuda on Hopper), kv_relevance (Qwen2-7B, 512
question rows x 8k keys), decode (Qwen2-7B, 8k, split + combine kernels) and the W4A16 GEMVs of one Qwen2.5-7B layer
at batch 1 (fused q/k/v, o, gate/up emitting silu(gate) * up, down: the 4-bit decode step's 72 %; the small ones
run at ~1 TB/s whatever their config).
"""
import argparse

import torch

import sparsevila_ops as so
from bench.common import require_gpu
from sparsevila_ops.quant import quantize_w4, w4a16_linear


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    if not require_gpu("bench.ncu_targets"):
        return 0
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    # Salience, SigLIP 64 frames: [64*729, 16, 72].
    B, N, H, D = 64, 729, 16, 72
    q, k = torch.randn(B * N, H, D, device=dev, dtype=bf), torch.randn(B * N, H, D, device=dev, dtype=bf)
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=dev)
    # Relevance, Qwen2-7B: 28 q / 4 kv heads x 128, 512 question rows at the end of 8192 keys.
    n, m = 8192, 512
    qr = torch.randn(m, 28, 128, device=dev, dtype=bf)
    kr = torch.randn(n, 4, 128, device=dev, dtype=bf)
    cq = torch.tensor([0, m], dtype=torch.int32, device=dev)
    ck = torch.tensor([0, n], dtype=torch.int32, device=dev)
    lse = torch.randn(28, m, device=dev) + 10.0
    rows = torch.tensor([[0, m]], dtype=torch.int32, device=dev)
    # Decode, Qwen2-7B at 8k.
    qd = torch.randn(1, 28, 128, device=dev, dtype=bf)
    kd, vd = (torch.randn(1, 4, n, 128, device=dev, dtype=bf) for _ in range(2))
    lengths = torch.full((1,), n, dtype=torch.int32, device=dev)
    # W4A16 GEMVs, Qwen2.5-7B at batch 1: (out rows of W, in features, glu).
    gemvs = [(quantize_w4(torch.randn(rows_w, cols, device=dev, dtype=bf) * 0.02), glu,
              torch.randn(1, cols, device=dev, dtype=bf))
             for rows_w, cols, glu in ((4608, 3584, False), (3584, 3584, False), (37888, 3584, True),
                                       (3584, 18944, False))]

    def once():
        so.visual_salience(q, k, cu, N)
        so.kv_relevance(qr, kr, lse, cq, ck, m, n, rows)
        so.decode_attention(qd, kd, vd, lengths)
        for w4, glu, x in gemvs:
            w4a16_linear(x, w4, glu=glu)

    once()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    once()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
