"""LLaVA-OneVision-7B's SigLIP tower at 128k visual tokens (669 frames of 27 x 27 patches), bf16: transformers'
layouts against the integration's. e2e's encoder profile (``bench/NOTES.md``) put 0.93 s of the 2.26 s tower in
``apply_pooling``'s NCHW bilinear kernel and ~0.44 s in adds and copies of a permuted activation layout.

- layer: one SigLIP encoder layer (SDPA attention) on the permuted activations transformers' patch embeddings give
  (``flatten(2).transpose(1, 2)``) vs on contiguous ones (what ``enable`` makes them);
- pooling: ``LlavaOnevisionModel.apply_pooling`` (an NCHW copy, then the NCHW bilinear kernel) vs the integration's
  ``channels_last_pooling``, on the projector's output ``[frames, 729, 3584]``.

``python -m bench.siglip_tower [--frames N]``. Per row: time per call, per encoder (x the tower's layers for the
layer), the speedup over stock, the pooling's bytes floor (input read once, output written once, at the measured
copy bandwidth), and whether the output equals stock's bit for bit (checked within 1e-2 before timing).
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from bench.common import copy_bandwidth_tbps, require_gpu, time_cuda, verify, write_results

FRAMES = 669  # bench.e2e's 128k LLaVA-OneVision video


def _vision_config():
    from transformers import SiglipVisionConfig
    from sparsevila_ops.integrations.demo import LLAVA_OV_7B
    cfg = SiglipVisionConfig(**{k: v for k, v in LLAVA_OV_7B["vision_config"].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    return cfg


def _layer(frames, time, device="cuda", cfg=None):
    """One encoder layer on permuted vs contiguous activations ``[frames, patches, hidden]``."""
    from transformers.models.siglip import modeling_siglip as hf
    cfg = cfg or _vision_config()
    layer = hf.SiglipEncoderLayer(cfg).to(device, torch.bfloat16).eval()
    n = (cfg.image_size // cfg.patch_size) ** 2
    permuted = torch.randn(frames, cfg.hidden_size, n, device=device, dtype=torch.bfloat16).transpose(1, 2)
    contiguous = permuted.contiguous()
    want, got = layer(permuted, None), layer(contiguous, None)
    verify("SigLIP layer on contiguous activations", got.float(), want.float(), 1e-2)
    stock, ours = time(lambda: layer(permuted, None)), time(lambda: layer(contiguous, None))
    layers = cfg.num_hidden_layers
    return [{"step": "encoder layer", "variant": "permuted activations (transformers)", "median_ms": stock,
             "per_encoder_ms": layers * stock},
            {"step": "encoder layer", "variant": "contiguous activations (enable)", "median_ms": ours,
             "per_encoder_ms": layers * ours, "speedup": stock / ours, "bitwise_equal": torch.equal(got, want)}]


def _pooling(frames, bw, time, device="cuda", side=27, dim=3584):
    """``apply_pooling`` vs ``channels_last_pooling`` on ``[frames, side * side, dim]``."""
    from transformers.models.llava_onevision import modeling_llava_onevision as hf
    from sparsevila_ops.integrations.llava_onevision import channels_last_pooling
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=14 * side,
                                                                                 patch_size=14)))
    x = torch.randn(frames, side * side, dim, device=device, dtype=torch.bfloat16)
    want, got = hf.LlavaOnevisionModel.apply_pooling(owner, x), channels_last_pooling(owner, x)
    verify("channels-last pooling", got.float(), want.float(), 1e-2)
    stock = time(lambda: hf.LlavaOnevisionModel.apply_pooling(owner, x))
    ours = time(lambda: channels_last_pooling(owner, x))
    floor = (x.numel() + want.numel()) * x.element_size() / bw * 1e3
    return [{"step": "video pooling", "variant": "apply_pooling (NCHW copy + NCHW bilinear)", "median_ms": stock,
             "per_encoder_ms": stock, "floor_ms": floor, "x_floor": stock / floor},
            {"step": "video pooling", "variant": "channels_last_pooling (enable)", "median_ms": ours,
             "per_encoder_ms": ours, "floor_ms": floor, "x_floor": ours / floor, "speedup": stock / ours,
             "bitwise_equal": torch.equal(got, want)}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=FRAMES, help=f"frames of 27 x 27 patches (default {FRAMES})")
    a = p.parse_args(argv)
    if a.frames < 1:
        p.error(f"--frames must be >= 1; got {a.frames}")
    if not require_gpu("bench.siglip_tower"):
        return 0
    torch.manual_seed(0)
    time = lambda fn: time_cuda(lambda i: fn(), warmup=1, iters=5)["median_ms"]  # noqa: E731
    with torch.no_grad():
        rows = _layer(a.frames, time) + _pooling(a.frames, copy_bandwidth_tbps() * 1e12, time)
    write_results("siglip_tower", rows, ["step", "variant", "median_ms", "per_encoder_ms", "floor_ms", "x_floor",
                                         "speedup", "bitwise_equal"],
                  title=f"LLaVA-OneVision-7B SigLIP tower, {a.frames} frames, bf16: transformers' layouts vs ours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
