"""Table 2: end-to-end latency of Qwen2.5-VL-7B (random weights) on long videos, bf16 and 4-bit weights.

``python -m bench.e2e [--quick] [--model qwen2_5_vl|llava_onevision] [--tokens 16384 65536 131072] [--precision
bf16 w4a16] [--rows a b c1 c2 c3] [--decode-steps 256] [--no-inductor-pdl] [--step-graph]``. The model is
``sparsevila_ops.integrations.demo.build_model`` (the QWEN25_VL_7B config, or with ``--model llava_onevision``
LLAVA_OV_7B: SigLIP so400m and Qwen2-7B; bf16; latency does not depend on weight values), the inputs
``demo.video_inputs``:

- one video of F frames at 448x448 px (32x32 patches of 14 px): a 2x2 merge and 2-frame temporal patches make
  F/2 * 16 * 16 = 128 F LLM visual tokens, so 128 / 512 / 1024 frames give 16384 / 65536 / 131072 visual tokens
  (``video_for_tokens``); LLaVA-OneVision: frames of 384x384 px (27x27 patches pooled to 14x14), 196 tokens per
  frame and the video's newline, so 84 / 334 / 669 frames; 12 text tokens before the video, a 64-token question
  after;
- E: vision encoder incl. salience and pruning (until the LLM's first forward; the median of the timed run's and
  ``E_REPEATS`` more runs stopped there, all in ``E_samples_ms``: one run's E can be an outlier), P: the LLM
  prefill incl. relevance and select + pack (its first forward), D: ms per generated token over
  ``--decode-steps`` greedy tokens (default 256; EOS ignored, ``eos_token_id=None``, as serving benchmarks'
  ``ignore_eos``: random weights may emit EOS anywhere, and ``min_new_tokens`` instead would add a logits
  processor's four eager ops per step, ~0.45 ms of host time on the H200) after a warm-up ``generate`` of the same
  length (compiles and graph captures happen there; ``graphs_compiled_in_timed_run`` > 0 flags a D that includes a
  recompile), stage
  boundaries from ``demo.StageTimer``; E2E = E + P + 1500 D: the 1500-token answer is estimated from the timed
  steps (its steps read on average ~620 more KV entries, 36 MB: < 1 % of any row's bytes per step);
- rows: (a) stock transformers (SDPA, stock vision loop, ``StaticCache`` + the decode step compiled into CUDA
  graphs as ``generate`` does); (b) ours at sparsities (0, 0): our vision attention in one launch per block, our
  prefill and decode kernels, decode step compiled as the integration compiles it (``enable(..., cuda_graph=True)``:
  transformers' CUDA graphs plus inductor's PDL on Hopper, ``decode_compile``; ``--no-inductor-pdl``: without;
  ``SPARSEVILA_PDL=0`` turns it off in our kernels too, ``kernel_pdl`` in the rows: with both off a profiled
  kernel's duration is its own, not also its wait for the one before);
  (c) ours at (0.75, 0.95), (0.70, 0.85) and (0.90, 0). Every row in bf16 and with the LLM's linear layers in 4-bit
  (``quantize_model_linears``, group 128; the vision tower and lm_head stay bf16). Speedups are over row (b) of
  the same input and precision;
- D_gpu: the GPU time of one decode step as ``generate`` runs it, from ``torch.profiler`` (busy time, the union
  of kernel intervals, of a run of 20 tokens minus one of 4, per step), with launches per step and summed ms per
  kernel kind (``step`` in the JSON). D - D_gpu is the GPU idle, split by length (``idle_gaps``): gaps up to
  10 us between kernels are launch latency inside the CUDA graph (a kernel not launched early by PDL), longer ones
  the GPU waiting for the host (``generate``'s per-step Python), and gaps over 10 ms are one-off stalls, reported
  apart (``stalls_ms``); ``host_top_ms`` names the host ops of a step,
  ``cudaEventSynchronize`` being the host's wait for the GPU;
- D_wait: the host's wait for the GPU per decode step, timed without a profiler (``stop_check_times``): ~0 when
  the step is host-bound (D is the host's time), else the host runs that far ahead and D is the GPU's time;
- E_sm_mhz, P_sm_mhz, D_sm_mhz: the SM clock's median over each stage of the timed run (NVML, read every
  ``GPU_SAMPLE_S`` by ``common.GpuSampler``); the JSON's ``gpu`` holds each stage's readings in full (min clock,
  power, the shares of readings NVML marks power-capped or thermally slowed). Compute-bound stages under a power
  cap run below the boost clock, so a machine's power headroom moves E and P; these columns say by how much;
- beside D its byte floor: (weight bytes read per token + KV bytes read per step) / device copy bandwidth
  measured in the same run (``decode_floor_ms``), and D / floor. KV read per step = the valid entries a decode
  step must read (``decode_kv_tokens``), the same for (a) and (b).

Writes ``e2e.{json,md,png}`` (``--quick``: 16k, rows a, b, c1, 64 decode steps: ``e2e_quick``; LLaVA-OneVision:
``e2e_llava_onevision``, ``e2e_quick_llava_onevision``). A full run at
128k takes several minutes per precision: run inputs/precisions separately with ``--tokens``/``--precision``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch._dynamo.utils import counters

from bench.common import GpuSampler, copy_bandwidth_tbps, require_gpu, write_results
from sparsevila_ops.integrations.demo import (LLAVA_OV_7B, QWEN25_VL_7B, StageTimer, build_model, stage_row,
                                               video_inputs)
from sparsevila_ops._device import use_pdl
from sparsevila_ops.integrations.decode_compile import decode_compile_config

ANSWER_TOKENS = 1500
QUESTION_TOKENS = 64
SIDE_PATCHES = 32  # 448 px
MODELS = {"qwen2_5_vl": ("Qwen2.5-VL-7B", QWEN25_VL_7B), "llava_onevision": ("LLaVA-OneVision-7B", LLAVA_OV_7B)}
UNPRUNED = {"llava_onevision": 1}  # visual tokens per video the prefill pruning keeps (LLaVA-OneVision: the newline)
ROWS = {"a": ("stock transformers", None), "b": ("ours (0, 0)", (0.0, 0.0)), "c1": ("ours (0.75, 0.95)", (0.75, 0.95)),
        "c2": ("ours (0.70, 0.85)", (0.70, 0.85)), "c3": ("ours (0.90, 0)", (0.90, 0.0))}
PRECISIONS = ("bf16", "w4a16")
TARGETS = (16384, 65536, 131072)
GAP_SHORT_US = 10.0  # idle gaps between kernels up to this are launch latency, longer ones host waits
GAP_STALL_US = 10_000.0  # longer than this: a one-off stall (GC, the profiler), no step's; counted apart
DECODE_MARK = "sparsevila.bench.decode_step"  # record_function around _StopAfter: the host window
E_REPEATS = 4  # runs up to the LLM per row beside the timed one; E is their median (one timed E once ran 16 %
# over its GPU time, other runs 1-4 %; at 4d1a371 three samples of one row spread 110 ms at 128k, 7 %)
GPU_SAMPLE_S = 0.05  # NVML readings (clock, power) every 50 ms during a row: ~25 per stage of ~1.2 s at 128k


# -- pure parts (tested on the CPU) ---------------------------------------------------------------------------
def video_for_tokens(target: int, side: int = SIDE_PATCHES, model: str = "qwen2_5_vl") -> Dict[str, int]:
    """Frames of ``side x side`` patches (14 px) giving about ``target`` LLM visual tokens: every 2 frames x
    2x2 patches merge into one token, so tokens = frames / 2 * (side / 2)^2, frames = 2 * round(target / (side/2)^2).
    ``model="llava_onevision"``: frames of its tower's size (384 px, 27 x 27 patches, ``side`` unused), each pooled
    to 14 x 14 = 196 tokens, plus one newline per video: frames = round(target / 196)."""
    if model == "llava_onevision":
        vcfg = LLAVA_OV_7B["vision_config"]
        n = vcfg["image_size"] // vcfg["patch_size"]
        per = ((n + 1) // 2) ** 2
        frames = max(1, round(target / per))
        return {"frames": frames, "h": n, "w": n, "px": vcfg["image_size"], "visual_tokens": frames * per + 1}
    if model != "qwen2_5_vl":
        raise ValueError(f"model must be one of {sorted(MODELS)}; got {model!r}")
    if isinstance(side, bool) or not isinstance(side, int) or side < 2 or side % 2:
        raise ValueError(f"side must be an even number of patches >= 2; got {side}")
    per = (side // 2) ** 2
    t = max(1, round(target / per))
    return {"frames": 2 * t, "h": side, "w": side, "px": 14 * side, "visual_tokens": t * per}


def kept_visual(n: int, sparsity: float) -> int:
    """Visual tokens (or KV entries) kept of ``n`` at ``sparsity``: the rule of ``prune_visual_tokens`` and of the
    cache's select + pack, ``max(1, round((1 - sparsity) n))``; all of them at sparsity 0."""
    return n if sparsity == 0 or n == 0 else max(1, round((1.0 - sparsity) * n))


def decode_kv_tokens(prompt_tokens: int, visual_tokens: int, prefill_sparsity: float, decode_sparsity: float,
                     steps: int, unpruned: int = 0) -> float:
    """Mean KV entries (per layer and KV head) a decode step reads over ``steps`` generated tokens: the text of
    the prompt, the visual entries kept by pruning and then by select + pack, and on average ``steps / 2``
    generated tokens (step t = 1 .. steps-1 reads t of them). ``unpruned`` of the visual tokens are never pruned
    by the prefill but are visual entries for select + pack (LLaVA-OneVision's video newline: ``UNPRUNED``)."""
    vis = kept_visual(kept_visual(visual_tokens - unpruned, prefill_sparsity) + unpruned, decode_sparsity)
    return prompt_tokens - visual_tokens + vis + steps / 2


def kv_bytes_per_token(text_config, elem_bytes: int = 2) -> int:
    """K + V bytes of one token over all layers."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * elem_bytes


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer of the LLM except the embedding table
    (one row is read), plus lm_head. 4-bit layers count their packed nibbles, scales and zeros."""
    lm = model.model.language_model
    tensors = itertools.chain(lm.named_parameters(), lm.named_buffers())
    total = sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith("embed_tokens."))
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def decode_floor_ms(weight_bytes: float, kv_tokens: float, kv_bytes_tok: int, copy_tbps: float) -> float:
    """(weight bytes + KV bytes) read per decode step / copy bandwidth, in ms."""
    return (weight_bytes + kv_tokens * kv_bytes_tok) / (copy_tbps * 1e12) * 1e3


def assemble(rows: List[dict], copy_tbps: Optional[float], kv_bytes_tok: int,
             answer_tokens: int = ANSWER_TOKENS) -> List[dict]:
    """The table: per measured row, E2E = E + P + answer_tokens * D, D's byte floor and D / floor (when the copy
    bandwidth is known), and E / P / D / E2E speedups over row (b) of the same input and precision."""
    out = []
    for r in rows:
        r = dict(r)
        r["E2E_s"] = (r["E_ms"] + r["P_ms"] + answer_tokens * r["D_ms"]) / 1e3
        if copy_tbps:
            r["D_floor_ms"] = decode_floor_ms(r["weight_bytes"], r["kv_tokens"], kv_bytes_tok, copy_tbps)
            r["D_over_floor"] = r["D_ms"] / r["D_floor_ms"]
            if "D_gpu_ms" in r:
                r["D_gpu_over_floor"] = r["D_gpu_ms"] / r["D_floor_ms"]
        out.append(r)
    base = {(r["visual_tokens"], r["precision"]): r for r in out if r["row"] == "b"}
    for r in out:
        b = base.get((r["visual_tokens"], r["precision"]))
        for col, key in (("E", "E_ms"), ("P", "P_ms"), ("D", "D_ms"), ("E2E", "E2E_s")):
            r[f"{col}_speedup"] = b[key] / r[key] if b is not None and r[key] > 0 else None
    return out


# Kernel-name fragments (lower case) per kind, first match wins: cuBLAS (nvjet / gemv / xmma / cutlass / split-K
# reduce) and our W4A16 GEMV; attention (our append + decode kernels, SDPA's flash / mem-efficient kernels);
# inductor's fused element-wise and reduction kernels (triton_poi / triton_red / triton_per); the rest.
KERNEL_KINDS = (("linear", ("nvjet", "gemv", "gemm", "xmma", "cutlass", "splitkreduce", "w4a16", "gemv4")),
                ("attention", ("decode", "append_kv", "flash", "fmha", "attention", "sdpa")),
                ("fused (inductor)", ("triton_",)))


def kernel_kind(name: str, kinds=None) -> str:
    """The kind of a CUDA kernel name: the first of ``kinds`` (default ``KERNEL_KINDS``: ``linear``,
    ``attention``, ``fused (inductor)``) whose name fragments it contains, else ``other``."""
    low = name.lower()
    return next((kind for kind, parts in kinds or KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_summary(kernels: Dict[str, Tuple[float, float]], kinds=None) -> dict:
    """``{name: (us, launches)}`` summed: kernel ms, launches, ms per kind (``kernel_kind``), the 16 costliest (a
    decode step has ~12 kinds of kernel per layer)."""
    by_kind: Dict[str, float] = {}
    for n, (us, _) in kernels.items():
        by_kind[kernel_kind(n, kinds)] = by_kind.get(kernel_kind(n, kinds), 0.0) + us / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:16]
    return {"kernel_sum_ms": sum(us for us, _ in kernels.values()) / 1e3,
            "launches": sum(c for _, c in kernels.values()),
            "kinds_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n[:120], "us": round(us, 2), "calls": round(c, 2)} for n, (us, c) in top]}


# kernels: (us, launches), busy us, host us, idle gaps (short us, count, long us, count)
Profile = Tuple[Dict[str, Tuple[float, int]], float, Dict[str, float], Tuple[float, int, float, int]]


def busy_us(intervals: Sequence[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: GPU time with at least one kernel running. Kernels
    overlap under programmatic dependent launch (the next one starts and waits in ``griddepcontrol.wait``), so
    summed durations overcount."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def holes(spans: Sequence[tuple]):
    """The holes in the union of ``(start, end, ...)`` spans, in time order: ``(gap, span before, span after)``,
    the span before being the one that ended last."""
    last = None
    for span in sorted(spans):
        if last is not None and span[0] > last[1]:
            yield span[0] - last[1], last, span
        if last is None or span[1] > last[1]:
            last = span


def idle_gaps(intervals: Sequence[Tuple[float, float]], short_us: float = GAP_SHORT_US,
              stall_us: float = GAP_STALL_US) -> Tuple[float, int, float, int, float, int]:
    """Idle time between kernels (``holes`` in their union): ``(us, count)`` of gaps up to ``short_us`` (a launch's
    latency inside a CUDA graph, where the next kernel is not launched early by PDL), of longer ones up to
    ``stall_us`` (the GPU waiting for the host), and of stalls longer still (one-off: a GC pause, the profiler's
    own work; a per-step difference of two runs would carry them as noise)."""
    out = [0.0, 0, 0.0, 0, 0.0, 0]
    for gap, _, _ in holes(intervals):
        i = 0 if gap <= short_us else 2 if gap <= stall_us else 4
        out[i] += gap
        out[i + 1] += 1
    return tuple(out)


def step_kernels(short: Profile, long: Profile, steps: int) -> dict:
    """Per decode step, from two profiled runs that differ by ``steps`` decode steps (``profile_kernels``): GPU
    busy ms (the union of kernel intervals), the summed kernel ms (PDL waits counted twice), launches, summed ms
    per kernel kind, the 8 kernels costing most (us, calls), ``host_ms``: host ms of the top-level profiled
    host ops (the compiled step's call, ``aten`` ops outside it; pure Python between them is not an op), the 6
    costliest by name, and the GPU's idle gaps (``idle_gaps``): ``gap_launch_ms`` / ``gaps_launch`` (short, launch
    latency) and ``gap_host_ms`` / ``gaps_host`` (longer, waiting for the host) per step; ``stalls_ms``: the
    one-off stalls of the short and the long run (not per step)."""
    (k_short, b_short, h_short, g_short), (k_long, b_long, h_long, g_long) = short, long
    diff = {n: (k_long[n][0] - k_short.get(n, (0.0, 0))[0], k_long[n][1] - k_short.get(n, (0.0, 0))[1])
            for n in k_long}
    per = {n: (us / steps, c / steps) for n, (us, c) in diff.items() if c > 0}
    host = {n: (us - h_short.get(n, 0.0)) / steps / 1e3 for n, us in h_long.items()}
    host = {n: ms for n, ms in host.items() if ms > 0}
    top = dict(sorted(host.items(), key=lambda kv: -kv[1])[:6])
    gaps = [(x - y) / steps for x, y in zip(g_long, g_short)]
    return {"gpu_ms": (b_long - b_short) / steps / 1e3, **kernel_summary(per), "host_ms": sum(host.values()),
            "host_top_ms": {n[:80]: round(ms, 4) for n, ms in top.items()},
            "gap_launch_ms": gaps[0] / 1e3, "gaps_launch": gaps[1], "gap_host_ms": gaps[2] / 1e3, "gaps_host": gaps[3],
            "stalls_ms": [g_short[4] / 1e3, g_long[4] / 1e3]}


def profile_kernels(fn: Callable[[], object], host_since: Optional[str] = None) -> Profile:
    """Kernels of one ``fn()`` under ``torch.profiler`` (inside CUDA-graph replays too): ``{name: (summed device
    us, launches)}``, the busy time (``busy_us``), ``{name: host us}`` of the top-level host ops and the kernels'
    ``idle_gaps``; with ``host_since``, all of them only from the first host op of that name on. A decode step
    is then measured alone: the prefill's host wait would swamp its host ops, and the run-to-run noise of the
    prefill's GPU time (0.1 % of seconds) its busy time, in the difference of two runs (``step_kernels``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return summarize_events(prof.events(), host_since)


def summarize_events(events, host_since: Optional[str] = None) -> Profile:
    """``profile_kernels``' sums over profiler events (``device_type``, ``name``, ``time_range``, ``cpu_parent``)."""
    out: Dict[str, Tuple[float, int]] = {}
    host: Dict[str, float] = {}
    spans = []
    since = min((e.time_range.start for e in events if e.name == host_since
                 and e.device_type == torch.autograd.DeviceType.CPU), default=float("inf")) \
        if host_since else float("-inf")
    for e in events:
        if e.time_range.start < since:
            continue
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")) \
                and not getattr(e, "is_user_annotation", False):  # a record_function range's GPU side is no kernel
            us, c = out.get(e.name, (0.0, 0))
            out[e.name] = (us + e.time_range.elapsed_us(), c + 1)
            spans.append((e.time_range.start, e.time_range.end))
        elif e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None:
            host[e.name] = host.get(e.name, 0.0) + e.time_range.elapsed_us()
    return out, busy_us(spans), host, idle_gaps(spans)


ENCODER_KINDS = (("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_xmma", "splitkreduce")),
                 ("attention", ("flash", "fmha", "attention", "_attn", "prefill", "salience")),
                 ("conv", ("conv", "cudnn", "implicit")),
                 ("elementwise / reduce", ("elementwise", "reduce", "cat", "copy", "index", "gather", "scatter",
                                           "norm", "softmax", "triton_")))


def encoder_profile(model, inputs: dict) -> dict:
    """GPU time of one vision-tower pass over the input's video (as the row's ``enable`` left the tower; LLaVA-
    OneVision: SigLIP, projector and pooling of every frame, ``get_video_features``): busy ms, and
    ``kernel_summary`` with ``ENCODER_KINDS``."""
    pix = inputs["pixel_values_videos"]
    if hasattr(model.model, "visual"):  # Qwen2.5-VL
        visual = model.model.visual
        pix = pix.to(visual.dtype)  # outside the profile
        tower = lambda: visual(pix, grid_thw=inputs["video_grid_thw"])  # noqa: E731
    else:
        tower = lambda: model.model.get_video_features(pix)  # noqa: E731
    with torch.no_grad():
        kernels, busy, *_ = profile_kernels(tower)
    return {"gpu_ms": busy / 1e3, **kernel_summary(kernels, ENCODER_KINDS)}


class _AtLLM(Exception):
    """Raised by ``until_llm``'s hook: the language model's first forward was reached."""


def _stop_at_llm(model, generate: Callable[[], object], start: Optional[Callable[[], None]] = None) -> None:
    """Run ``generate()`` and stop it at the language model's first forward: before it (``start`` None) or, with
    ``start``, after it (``start()`` called as it begins)."""
    def stop(*_):
        raise _AtLLM
    lm = model.model.language_model
    if start is None:
        hooks = [lm.register_forward_pre_hook(stop)]
    else:
        hooks = [lm.register_forward_pre_hook(lambda *_: start()), lm.register_forward_hook(stop)]
    try:
        generate()
    except _AtLLM:
        return
    finally:
        for h in hooks:
            h.remove()
    raise RuntimeError("generate finished without a forward of the language model")


def until_llm(model, generate: Callable[[], object]) -> None:
    """Run ``generate()`` up to the language model's first forward, E's end (vision tower, salience, pruning, the
    prompt's positions), and stop it there."""
    _stop_at_llm(model, generate)


def time_until_llm(model, generate: Callable[[], object]) -> float:
    """Wall ms of ``until_llm(model, generate)`` between two device syncs: E as ``StageTimer`` times it."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    until_llm(model, generate)
    sync()
    return 1e3 * (time.perf_counter() - start)


def e_profile(model, generate: Callable[[], object]) -> dict:
    """GPU time of E as ``generate`` runs it (``until_llm``): busy ms, and ``kernel_summary`` with ``ENCODER_KINDS``;
    with E's wall time it says how much of E is host time, and between rows what salience and pruning add."""
    kernels, busy, *_ = profile_kernels(lambda: until_llm(model, generate))
    return {"gpu_ms": busy / 1e3, **kernel_summary(kernels, ENCODER_KINDS)}


P_MARK = "sparsevila::P"  # the profiler range that opens at the language model's first forward (p_profile)


def through_prefill(model, generate: Callable[[], object]) -> None:
    """Run ``generate()`` through the language model's first forward, P (the prefill with relevance, select +
    pack), and stop it there; a device sync and the ``P_MARK`` range open where P starts, and both close at its
    end."""
    mark, entered = torch.profiler.record_function(P_MARK), []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def start():
        sync()
        mark.__enter__()
        entered.append(True)
    try:
        _stop_at_llm(model, generate, start)
    finally:
        if entered:
            sync()
            mark.__exit__(None, None, None)


def p_profile(model, generate: Callable[[], object]) -> dict:
    """GPU time of P as ``generate`` runs it (``through_prefill``, kernels from ``P_MARK`` on): busy ms, the idle
    gaps between kernels (``idle_gaps``: ``gap_launch_ms`` short ones, ``gap_host_ms`` the GPU waiting for the
    host, ``stall_ms`` longer still) and ``kernel_summary`` with ``ENCODER_KINDS``; against P's wall time it says
    how much of P the GPU idles."""
    kernels, busy, _, gaps = profile_kernels(lambda: through_prefill(model, generate), host_since=P_MARK)
    return {"gpu_ms": busy / 1e3, "gap_launch_ms": gaps[0] / 1e3, "gaps_launch": gaps[1],
            "gap_host_ms": gaps[2] / 1e3, "gaps_host": gaps[3], "stall_ms": gaps[4] / 1e3,
            **kernel_summary(kernels, ENCODER_KINDS)}


@contextlib.contextmanager
def stop_check_times():
    """Yield a list that gets the host seconds of every call of ``generate``'s stop check (``StopCheck`` /
    ``DeferredStopCheck.__call__``, once per token). Nearly all of a call is the host's wait for the GPU (an event
    synchronize or a ``.item()``), timed without a profiler: a decode step whose call takes ~0 is host-bound, and
    one whose call takes t leaves the host t ms ahead (GPU-bound)."""
    from transformers.generation import utils as gen_utils

    times: List[float] = []
    saved = {cls: cls.__dict__["__call__"] for cls in (gen_utils.StopCheck, gen_utils.DeferredStopCheck)}

    def timed(call):
        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return call(self, *args, **kwargs)
            finally:
                times.append(time.perf_counter() - t)
        return wrapper
    for cls, call in saved.items():
        cls.__call__ = timed(call)
    try:
        yield times
    finally:
        for cls, call in saved.items():
            cls.__call__ = call


def phase_readings(gpu: GpuSampler, marks: Sequence[float]) -> Dict[str, dict]:
    """``gpu``'s summary over each stage of the timed run, from ``marks`` (its start and the ends of E, P, D on
    the host clock): {"E": ..., "P": ..., "D": ...}, each empty where no reading fell inside."""
    return {phase: gpu.summary(t0, t1) for phase, t0, t1 in zip("EPD", marks, marks[1:])}


def decode_wait_ms(times: Sequence[float]) -> Optional[float]:
    """Mean ms of the stop checks of the decode steps in ``times`` (``stop_check_times``): the first two calls
    wait for the prefill (the deferred check reads the previous token's flag) and are left out."""
    steps = times[2:]
    return 1e3 * sum(steps) / len(steps) if steps else None


class _StopAfter:
    """A ``generate`` stopping criterion: stop once ``n`` tokens are generated (the static cache keeps the size
    ``max_new_tokens`` gave it, so nothing recompiles). It counts from its first call, which follows the first
    token: the ids it sees are the model's call's, shorter than the caller's prompt when sparsevila pruned it."""

    def __init__(self, n: int):
        self.n, self.first = n, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first is None:
            self.first = input_ids.shape[1]
            if input_ids.is_cuda:  # the prefill ends before the host window opens: a wait for it is no step's
                torch.cuda.synchronize(input_ids.device)
        with torch.profiler.record_function(DECODE_MARK):  # after each token: opens profile_kernels' host window
            done = input_ids.shape[1] - self.first + 1 >= self.n
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def decode_step_profile(generate: Callable[..., object], short: int = 4, long: int = 20) -> dict:
    """GPU time of one decode step as ``generate`` runs it (CUDA graph included): kernels of a run stopped after
    ``long`` tokens minus one stopped after ``short``, per step (``step_kernels``). A first profiled run stopped
    after ``short`` is thrown away: the first profiled decode window of a row carried ~285 extra 10 µs-10 ms gaps
    (one step's launches, each waiting for the host), which the difference turned into negative gaps per step."""
    from transformers import StoppingCriteriaList

    runs = [profile_kernels(lambda n=n: generate(stopping_criteria=StoppingCriteriaList([_StopAfter(n)])),
                            host_since=DECODE_MARK) for n in (short, short, long)]
    return step_kernels(runs[1], runs[2], long - short)


# -- the harness ----------------------------------------------------------------------------------------------
def run_rows(model, inputs: dict, rows: Sequence[str], *, decode_steps: int, precision: str,
             video: Dict[str, int], profile_steps: int = 0, step_graph: bool = False) -> List[dict]:
    """Measure E, P, D of each row on one input (``demo.stage_row``: warm-up ``generate``, then a timed one);
    returns raw rows. E is the median of 1 + ``E_REPEATS`` runs: the timed one's and ``E_REPEATS`` more stopped at
    the LLM (``time_until_llm``, still enabled, before any profile), all of them in ``E_samples_ms``.
    ``kept_visual`` is what the pruning kept (``state.last_kept``), all visual tokens when nothing was pruned.
    ``profile_steps`` > 0 adds ``step``: the GPU time of one decode step from that many profiled steps
    (``decode_step_profile``), ``E_profile`` / ``P_profile``: the kernels of E and of P (``e_profile``,
    ``p_profile``), and for rows (a) and (b) ``encoder``: one vision-tower pass (``encoder_profile``)."""
    prompt = inputs["input_ids"].shape[1]
    n_vis = int((inputs["input_ids"] == model.config.video_token_id).sum())
    unpruned = UNPRUNED.get(model.config.model_type, 0)
    weights = decode_weight_bytes(model)
    timer = StageTimer(model)
    gen = dict(max_new_tokens=decode_steps, eos_token_id=None, do_sample=False)  # EOS ignored (module doc)
    out = []
    for key in rows:
        label, sp = ROWS[key]
        kw = dict(gen, cache_implementation="static") if sp is None else gen
        graphs = []  # unique graphs compiled before each generate: the timed one is the second
        waits = []  # each generate's stop-check times (stop_check_times): the timed one is the last

        def generate(kw=kw):
            graphs.append(counters["stats"]["unique_graphs"])
            with stop_check_times() as times:
                out = model.generate(**inputs, **kw)
            waits.append(times)
            return out

        def probe(kw=kw, key=key):
            graphs.append(counters["stats"]["unique_graphs"])  # the timed run ends here
            found = {"E_repeats_ms": [time_until_llm(model, lambda: model.generate(**inputs, **kw))
                                      for _ in range(E_REPEATS)]}
            if not profile_steps:
                return found
            try:
                found["step"] = decode_step_profile(lambda **more: model.generate(**inputs, **kw, **more),
                                                    long=min(decode_steps, 4 + profile_steps))
                if key in ("a", "b"):  # the vision tower is the same in every row of ours
                    found["encoder"] = encoder_profile(model, inputs)
                found["E_profile"] = e_profile(model, lambda: model.generate(**inputs, **kw))
                found["P_profile"] = p_profile(model, lambda: model.generate(**inputs, **kw))
            except Exception as e:  # noqa: BLE001 - the row's E, P, D stand without the profile
                print(f"  ({key}: profile incomplete: {type(e).__name__}: {e})"[:300], flush=True)
            return found

        with GpuSampler(period_s=GPU_SAMPLE_S) as gpu:
            r = stage_row(model, timer, generate, decode_steps, sp, cuda_graph=True, step_graph=step_graph,
                          probe=probe)
        recompiled = graphs[2] - graphs[1]
        e_samples = [r["E_ms"], *r["probe"]["E_repeats_ms"]]
        p, d = sp or (0.0, 0.0)
        row = {"input": f"{round(n_vis / 1024)}k" if n_vis >= 1024 else str(n_vis), "frames": video["frames"],
               "px": video["px"], "visual_tokens": n_vis, "precision": precision, "row": key, "setting": label,
               "kept_visual": n_vis if r["kept"] is None else r["kept"],
               "kv_tokens": decode_kv_tokens(prompt, n_vis, p, d, decode_steps, unpruned), "weight_bytes": weights,
               "E_ms": statistics.median(e_samples), "E_samples_ms": e_samples, "P_ms": r["P_ms"], "D_ms": r["D_ms"],
               "generated": r["out"].shape[1] - prompt, "graphs_compiled_in_timed_run": recompiled,
               "D_wait_ms": decode_wait_ms(waits[-1]), "gpu": phase_readings(gpu, r["marks"])}
        row.update({f"{phase}_sm_mhz": got.get("sm_clock_median_mhz") for phase, got in row["gpu"].items()})
        if "step" in r["probe"]:
            row["D_gpu_ms"], row["step"] = r["probe"]["step"]["gpu_ms"], r["probe"]["step"]
        for part in ("encoder", "E_profile", "P_profile"):
            if part in r["probe"]:
                row[part] = r["probe"][part]
        out.append(row)
        print(f"  {precision:6s} {row['input']:>5s} ({key}) {label:22s} E {row['E_ms']:9.1f} ms  P {row['P_ms']:9.1f} "
              f"ms  D {row['D_ms']:7.3f} ms/token (host waits {row['D_wait_ms'] or 0:.3f}; SM MHz E / P / D "
              f"{row['E_sm_mhz']} / {row['P_sm_mhz']} / {row['D_sm_mhz']})"
              + (f" (GPU {row['D_gpu_ms']:.3f} ms, {row['step']['launches']:.0f} "
                                                       f"launches, idle {row['step']['gap_launch_ms']:.3f} ms in "
                                                       f"{row['step']['gaps_launch']:.0f} launch gaps + "
                                                       f"{row['step']['gap_host_ms']:.3f} ms in "
                                                       f"{row['step']['gaps_host']:.0f} longer, stalls "
                                                       f"{row['step']['stalls_ms']} ms, host ops "
                                                       f"{row['step']['host_ms']:.3f} ms: "
                                                       f"{row['step']['host_top_ms']})" if "D_gpu_ms" in row else ""),
              flush=True)
        if "P_profile" in row:
            pp = row["P_profile"]
            print(f"    P: GPU busy {pp['gpu_ms']:.1f} ms, idle {pp['gap_launch_ms']:.1f} ms in {pp['gaps_launch']} "
                  f"launch gaps + {pp['gap_host_ms']:.1f} ms in {pp['gaps_host']} longer + {pp['stall_ms']:.1f} ms "
                  f"stalls; {pp['kinds_ms']}", flush=True)
    return out


def run(targets: Sequence[int], precisions: Sequence[str], rows: Sequence[str], decode_steps: int,
        profile_steps: int = 0, done: Optional[Callable[[List[dict], float], None]] = None,
        inductor_pdl: bool = True, step_graph: bool = False, model_name: str = "qwen2_5_vl") -> tuple:
    """The full-size table on the GPU: returns (rows, copy bandwidth TB/s, KV bytes per token). ``done(table,
    copy TB/s)`` gets the table so far after each row (so a run cut short keeps what it measured).
    ``inductor_pdl``: our rows' decode steps compiled as the integration compiles them (``decode_compile``:
    inductor's PDL on Hopper); False compiles them with transformers' default ``CompileConfig()`` as the stock row
    (the A/B of ``--no-inductor-pdl``). Each row says ``inductor_pdl``. ``step_graph``: our rows' decode steps
    replayed from the integration's own graphs (``enable(..., step_graph=True)``; ``--step-graph``); each row says
    ``step_graph``. ``model_name``: a key of ``MODELS``.

    One model serves every precision: ``w4a16`` quantizes its LLM linears in place and nothing restores them,
    so ``precisions`` must list bf16 before w4a16 (``PRECISIONS`` order, each once; ``ValueError`` otherwise).
    """
    from sparsevila_ops.quant import quantize_model_linears

    order = [PRECISIONS.index(p) if p in PRECISIONS else -1 for p in precisions]
    if order != sorted(set(order)) or -1 in order:
        raise ValueError(f"precisions must be drawn from {PRECISIONS} in that order, each once (w4a16 quantizes "
                         f"the model in place for good, so bf16 rows run first); got {list(precisions)}")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    copy_tbps = copy_bandwidth_tbps()
    model = build_model(True, dev, dtype, model_name)
    if not inductor_pdl:
        from transformers import CompileConfig
        model.generation_config.compile_config = CompileConfig()  # set, so the integration adds nothing
    pdl = inductor_pdl and decode_compile_config(dev) is not None
    kv_tok = kv_bytes_per_token(model.config.text_config)
    raw = []
    for precision in precisions:
        if precision == "w4a16":
            quantize_model_linears(model.model.language_model, group_size=128)
            torch.cuda.empty_cache()
        for target in targets:
            video = video_for_tokens(target, model=model_name)
            inputs = video_inputs(model, video["frames"], video["h"], video["w"], QUESTION_TOKENS, dev, dtype)
            print(f"{precision}: video {video['frames']} frames of {video['px']}x{video['px']} px -> "
                  f"{video['visual_tokens']} visual tokens, prompt {inputs['input_ids'].shape[1]} tokens", flush=True)
            for key in rows:
                raw += [{**r, "inductor_pdl": pdl and key != "a", "kernel_pdl": use_pdl(dev) and key != "a",
                         "step_graph": step_graph and key != "a"}
                        for r in run_rows(model, inputs, [key], decode_steps=decode_steps, precision=precision,
                                          video=video, profile_steps=profile_steps, step_graph=step_graph)]
                if done is not None:
                    done(assemble(raw, copy_tbps, kv_tok), copy_tbps)
            del inputs
            torch.cuda.empty_cache()
    return assemble(raw, copy_tbps, kv_tok), copy_tbps, kv_tok


COLUMNS = ["input", "frames", "px", "precision", "row", "setting", "kept_visual", "kv_tokens", "E_ms", "P_ms",
           "D_ms", "D_floor_ms", "D_over_floor", "D_gpu_ms", "D_gpu_over_floor", "D_wait_ms", "E2E_s", "E_speedup",
           "P_speedup", "D_speedup", "E2E_speedup", "E_sm_mhz", "P_sm_mhz", "D_sm_mhz", "graphs_compiled_in_timed_run",
           "inductor_pdl", "kernel_pdl", "step_graph"]


def plot_stacked(rows: List[dict], answer_tokens: int = ANSWER_TOKENS):
    """Stacked E / P / answer_tokens x D bars (seconds) per row, one panel per input."""
    def plot(fig):
        inputs = list(dict.fromkeys(r["input"] for r in rows))
        for i, name in enumerate(inputs):
            ax = fig.add_subplot(1, len(inputs), i + 1)
            rs = [r for r in rows if r["input"] == name]
            x = range(len(rs))
            e = [r["E_ms"] / 1e3 for r in rs]
            p = [r["P_ms"] / 1e3 for r in rs]
            d = [answer_tokens * r["D_ms"] / 1e3 for r in rs]
            ax.bar(x, e, label="E (encoder)")
            ax.bar(x, p, bottom=e, label="P (prefill)")
            ax.bar(x, d, bottom=[a + b for a, b in zip(e, p)], label=f"decode ({answer_tokens} tokens)")
            ax.set_xticks(list(x))
            ax.set_xticklabels([f"{r['precision']} ({r['row']})" for r in rs], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{name} visual tokens", fontsize=9)
            if i == 0:
                ax.set_ylabel("s")
                ax.legend(fontsize=7)
    return plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16k input, rows a b c1, 64 decode steps")
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2_5_vl", help="the VLM (default qwen2_5_vl)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help=f"visual-token targets (default {TARGETS})")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None, help="default: both")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: all")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode tokens (default 256; quick 64)")
    p.add_argument("--name", default=None, help="result file name (default e2e, e2e_quick with --quick)")
    p.add_argument("--no-inductor-pdl", action="store_true",
                   help="compile our rows' decode steps as transformers does by default, without the integration's "
                        "inductor PDL (decode_compile)")
    p.add_argument("--step-graph", action="store_true",
                   help="our rows replay the decode step from the integration's own CUDA graphs "
                        "(enable(..., step_graph=True)) instead of inductor's CUDA-graph trees")
    p.add_argument("--profile-steps", type=int, default=16,
                   help="decode steps profiled per row for D_gpu, the GPU time of one step (0: none)")
    a = p.parse_args(argv)
    for t in a.tokens or ():
        if t < 1:
            p.error(f"--tokens must be positive; got {t}")
    if a.decode_steps is not None and a.decode_steps < 2:
        p.error(f"--decode-steps must be >= 2 (D is timed after the first token); got {a.decode_steps}")
    if a.profile_steps < 0:
        p.error(f"--profile-steps must be >= 0; got {a.profile_steps}")
    if not require_gpu("bench.e2e"):
        return 0
    targets = a.tokens or ((16384,) if a.quick else TARGETS)
    rows = a.rows or (["a", "b", "c1"] if a.quick else list(ROWS))
    precisions = [x for x in PRECISIONS if x in (a.precision or PRECISIONS)]
    steps = a.decode_steps or (64 if a.quick else 256)
    title, config = MODELS[a.model]
    default_name = ("e2e_quick" if a.quick else "e2e") + ("" if a.model == "qwen2_5_vl" else f"_{a.model}")

    def write(table, copy_tbps):
        write_results(a.name or default_name, table, COLUMNS, plot=plot_stacked(table),
                      title=f"Table 2: {title} ({config['text_config']['num_hidden_layers']} layers, random weights), "
                            f"E2E = E + P + {ANSWER_TOKENS} D from {steps} timed decode steps, copy {copy_tbps:.2f} "
                            f"TB/s")
    run(sorted(targets), precisions, rows, steps, a.profile_steps, done=write, inductor_pdl=not a.no_inductor_pdl,
        step_graph=a.step_graph, model_name=a.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
