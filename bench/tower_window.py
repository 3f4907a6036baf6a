"""Probe: ``window_attention`` as the Qwen2.5-VL-7B vision tower calls it, against the same kernel on
``bench.vision_block``'s synthetic inputs of the same shape.

At 128k visual tokens the tower's profile gave the kernel 3.4 ms per call (345d340), while ``bench.vision_block``
gives 2.70 ms alone and 2.24 ms right after the qkv GEMM (bench/NOTES.md). This runs the tower with ``enable``'s
kernels (random weights, bf16, ``bench.e2e``'s 128k video) once with CUDA events around each of the kernel's calls
and once under ``torch.profiler``, captures the first window block's arguments, and times the kernel alone on them,
on them with fresh contiguous cos / sin, and on synthetic ones (windows of 64 rows, fresh fp32 cos / sin). During
each run the SM clock, the power and NVML's clocks-event reasons are sampled every 20 ms (where NVML is readable).
It lists how the tower's arguments differ from the synthetic ones.

``python -m bench.tower_window [--tokens N]``: one row per variant, ms per call.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch

from bench.common import GpuSampler, require_gpu, time_cuda, write_results
from bench.vision_block import WINDOW, window_inputs


class _Captured(Exception):
    """Raised by ``capture``'s wrapper once it holds the first call's arguments."""


def _tower_pass(visual, pixels: torch.Tensor, grid_thw: torch.Tensor, wrap: Callable) -> None:
    """One tower pass with ``vision.window_attention`` replaced by ``wrap(real)`` (restored after; ``_Captured``
    ends the pass early)."""
    from sparsevila_ops.triton_kernels import vision
    real = vision.window_attention
    vision.window_attention = wrap(real)
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid_thw)
    except _Captured:
        pass
    finally:
        vision.window_attention = real


_NEVER_CALLED = "the tower never called window_attention (enable() it; CUDA, bf16 / fp16)"


def capture(visual, pixels: torch.Tensor, grid_thw: torch.Tensor) -> Dict[str, object]:
    """The arguments of the tower's first ``window_attention`` call (the tower is stopped there); raises
    ``RuntimeError`` if the tower never calls it (e.g. not ``enable``d, or not on the Triton path)."""
    got = {}

    def hook(real):
        def first_call(qkv, cos, sin, cu_seqlens, max_seqlen, scale, *rest):
            got.update(qkv=qkv, cos=cos, sin=sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
            raise _Captured
        return first_call

    _tower_pass(visual, pixels, grid_thw, hook)
    if not got:
        raise RuntimeError(_NEVER_CALLED)
    return got


def describe(args: Dict[str, object]) -> Dict[str, object]:
    """What may make the kernel's inputs differ from the synthetic ones: dtypes, strides, segment lengths."""
    lens = args["cu_seqlens"].diff()
    return {"qkv": f"{tuple(args['qkv'].shape)} {args['qkv'].dtype} strides {args['qkv'].stride()}",
            "cos": f"{tuple(args['cos'].shape)} {args['cos'].dtype} strides {args['cos'].stride()}",
            "sin": f"{tuple(args['sin'].shape)} {args['sin'].dtype} strides {args['sin'].stride()}",
            "windows": int(lens.numel()), "window_min": int(lens.min()), "window_max": int(lens.max()),
            "windows_not_64": int((lens != WINDOW).sum()), "max_seqlen": int(args["max_seqlen"])}


def synthetic_like(args: Dict[str, object]) -> Dict[str, object]:
    """``bench.vision_block``'s inputs of the captured shape: fresh qkv, windows of 64 rows, contiguous fp32
    cos / sin of one random angle per pair of columns (``vision_block.window_inputs``)."""
    qkv = args["qkv"]
    cos, sin, cu = window_inputs(qkv.shape[0], qkv.shape[-1], qkv.device)
    return dict(qkv=torch.randn_like(qkv), cos=cos, sin=sin, cu_seqlens=cu, max_seqlen=WINDOW, scale=args["scale"])


def timed_calls(visual, pixels: torch.Tensor, grid_thw: torch.Tensor, event=None) -> List[float]:
    """ms of each ``window_attention`` call in one tower pass, between two events recorded around it on the stream
    (no profiler, no sync inside the pass). ``event()``: a new timing event (default: ``torch.cuda.Event``)."""
    event = event or (lambda: torch.cuda.Event(enable_timing=True))
    pairs = []

    def timed(real):
        def call(*args, **kwargs):
            start, end = event(), event()
            start.record()
            out = real(*args, **kwargs)
            end.record()
            pairs.append((start, end))
            return out
        return call

    _tower_pass(visual, pixels, grid_thw, timed)
    if not pairs:
        raise RuntimeError(_NEVER_CALLED)
    pairs[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _call(args):
    from sparsevila_ops.triton_kernels import vision
    return vision.window_attention(args["qkv"], args["cos"], args["sin"], args["cu_seqlens"], args["max_seqlen"],
                                   args["scale"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="LLM visual tokens of the video (default 128k)")
    a = p.parse_args(argv)
    if not require_gpu("bench.tower_window"):
        return 0
    from bench.e2e import profile_kernels, video_for_tokens
    from sparsevila_ops.integrations import enable
    from sparsevila_ops.integrations.demo import build_model, video_inputs

    dev, dtype = torch.device("cuda"), torch.bfloat16
    model = enable(build_model(True, dev, dtype))
    video = video_for_tokens(a.tokens)
    inputs = video_inputs(model, video["frames"], video["h"], video["w"], 64, dev, dtype)
    visual, grid = model.model.visual, inputs["video_grid_thw"]
    pix = inputs["pixel_values_videos"].to(visual.dtype)
    with torch.no_grad():
        tower = lambda: visual(pix, grid_thw=grid)  # noqa: E731
        tower()  # compiles
    with GpuSampler() as clocks:
        times = timed_calls(visual, pix, grid)
    rows = [{"variant": "in the tower (CUDA events, per call)", "median_ms": statistics.median(times),
             "calls": len(times), **clocks.summary()}]
    with GpuSampler() as clocks, torch.no_grad():
        kernels, *_ = profile_kernels(tower)
    us, calls = next(((v for k, v in kernels.items() if "_window_attention_kernel" in k)), (0.0, 0))
    rows.append({"variant": "in the tower (torch.profiler, per call)", "median_ms": us / max(calls, 1) / 1e3,
                 "calls": calls, **clocks.summary()})
    args = capture(visual, pix, grid)
    info = describe(args)
    print("the tower's first window block:", info)
    contiguous = dict(args, cos=args["cos"].contiguous().clone(), sin=args["sin"].contiguous().clone())
    variants = (("alone, the tower's arguments", args),
                ("alone, the tower's qkv, fresh contiguous cos / sin", contiguous),
                ("alone, synthetic (bench.vision_block)", synthetic_like(args)))
    for name, x in variants:
        with GpuSampler() as clocks:
            ms = time_cuda(lambda _: _call(x))["median_ms"]
        rows.append({"variant": name, "median_ms": ms, **clocks.summary()})
    for r in rows:
        r.update({k: info[k] for k in ("windows", "windows_not_64", "window_max")})
    write_results("tower_window", rows, ["variant", "median_ms", "calls", "sm_clock_min_mhz", "sm_clock_median_mhz",
                                         "power_median_w", "power_limit_w", "power_capped_share", "thermal_share",
                                         "windows", "windows_not_64", "window_max"],
                  title=f"window_attention in the Qwen2.5-VL-7B tower vs alone ({video['visual_tokens']} visual "
                        f"tokens, bf16); first window block: {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
