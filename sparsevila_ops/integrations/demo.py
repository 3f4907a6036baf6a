"""``python -m sparsevila_ops demo --model qwen2_5_vl|llava_onevision``: one video through a VLM with random weights.

On a GPU the full 7B config (bf16: Qwen2.5-VL-7B, or LLaVA-OneVision-7B: SigLIP so400m and Qwen2-7B), else a tiny
config on the CPU. For each (prefill, decode)
sparsity it prints what was kept and the time of each stage, measured around ``generate`` with a device sync
at three points: E (vision encoder, salience and pruning: until the LLM's first forward starts), P (the LLM
prefill with relevance and select + pack: its first forward), D (ms per generated token after that,
including ``generate``'s per-step host work). On CUDA the decode step is compiled into a CUDA graph, the stock
row's with a ``StaticCache`` (``cache_implementation="static"``), unless ``--eager``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable, Optional, Tuple

import torch

from .._checks import device_flag_error

QWEN25_VL_7B = dict(
    vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3, tokens_per_second=2),
    text_config=dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28,
                     intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
TINY = dict(
    vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                       fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3, tokens_per_second=2),
    text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                     intermediate_size=128, vocab_size=160, max_position_embeddings=8192, bos_token_id=0,
                     eos_token_id=1, pad_token_id=2,
                     rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
    image_token_id=151, video_token_id=152, vision_start_token_id=153, vision_end_token_id=154, bos_token_id=0,
    eos_token_id=1, pad_token_id=2)


LLAVA_OV_7B = dict(  # llava-onevision-qwen2-7b: SigLIP so400m at 384 px (27 x 27 patches), Qwen2-7B
    vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                       num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
    text_config=dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                     num_hidden_layers=28, intermediate_size=18944, vocab_size=152128, max_position_embeddings=32768,
                     rope_theta=1e6),
    image_token_id=151646, video_token_id=151647, vision_feature_layer=-1, vision_feature_select_strategy="full")
LLAVA_OV_TINY = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, image_size=56, patch_size=14),
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=200, max_position_embeddings=8192,
                     bos_token_id=0, eos_token_id=1, pad_token_id=2),
    image_token_id=190, video_token_id=191, vision_feature_layer=-1, vision_feature_select_strategy="full",
    image_grid_pinpoints=[[56, 56]])


def build_model(full: bool, device: torch.device, dtype: torch.dtype, name: str = "qwen2_5_vl"):
    """``name`` (``qwen2_5_vl`` or ``llava_onevision``) with random weights (no download), initialized on
    ``device``."""
    import transformers

    if name == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(**(LLAVA_OV_7B if full else LLAVA_OV_TINY))
        cls = transformers.LlavaOnevisionForConditionalGeneration
    else:
        cfg = transformers.Qwen2_5_VLConfig(**(QWEN25_VL_7B if full else TINY))
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def video_inputs(model, frames: int, h: int, w: int, question: int, device, dtype) -> dict:
    """A video of ``frames`` frames of ``h x w`` patches (14 px; LLaVA-OneVision: its tower's fixed frame size)
    and a ``question``-token question; for Qwen2.5-VL with ``mm_token_type_ids`` (2 on the video's tokens), as
    its processor returns them, so that every row numbers the video's tokens with mRoPE's three rows."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    if cfg.model_type == "llava_onevision":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n_vis = frames * math.ceil(side / 2) ** 2 + 1  # pooled tokens, then the newline
        text = lambda n: torch.randint(3, min(1000, cfg.image_token_id - 3), (n,), generator=g)  # noqa: E731
        ids = torch.cat([text(12), torch.full((n_vis,), cfg.video_token_id), text(question)])[None].to(device)
        size = cfg.vision_config.image_size
        pix = torch.randn(1, frames, 3, size, size, generator=g).to(device=device, dtype=dtype)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pix)
    t = frames // 2
    n_vis = t * (h // 2) * (w // 2)
    text = lambda n: torch.randint(3, min(1000, cfg.vision_start_token_id - 3), (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(12), torch.tensor([cfg.vision_start_token_id]), torch.full((n_vis,), cfg.video_token_id),
                     torch.tensor([cfg.vision_end_token_id]), text(question)])[None].to(device)
    pix = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g).to(device=device, dtype=dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pix,
                video_grid_thw=torch.tensor([[t, h, w]], device=device), second_per_grid_ts=torch.tensor([1.0]),
                mm_token_type_ids=2 * (ids == cfg.video_token_id).int())


class StageTimer:
    """E / P / D of one ``generate`` call from hooks on the LLM (a sync at each of three boundaries)."""

    def __init__(self, model):
        self.lm = model.model.language_model
        self.marks = []

    def _sync_mark(self, *_):
        if len(self.marks) < 3:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    def run(self, fn):
        self.marks = []
        h1 = self.lm.register_forward_pre_hook(lambda *a: self._sync_mark() if len(self.marks) == 1 else None)
        h2 = self.lm.register_forward_hook(lambda *a: self._sync_mark() if len(self.marks) == 2 else None)
        try:
            self._sync_mark()
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            end = time.perf_counter()
        finally:
            h1.remove()
            h2.remove()
        start, e_end, p_end = self.marks
        return out, {"E_ms": 1e3 * (e_end - start), "P_ms": 1e3 * (p_end - e_end), "end": end, "p_end": p_end,
                     "marks": (start, e_end, p_end, end)}


def reset_compiled(model) -> None:
    """Forget what ``generate`` compiled and sized for the last row (compiled call, static cache length), so the
    next row compiles for its own shapes."""
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        model.__dict__.pop(attr, None)
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_row(model, timer: StageTimer, generate: Callable[[], torch.Tensor], new_tokens: int,
              sparsity: Optional[Tuple[float, float]] = None, *, cuda_graph: bool = True, step_graph: bool = False,
              probe: Optional[Callable[[], object]] = None) -> dict:
    """One measured row: ``enable(model, *sparsity, cuda_graph=cuda_graph, step_graph=step_graph)`` (None: stock
    transformers), a warm-up ``generate()`` (the same shapes JIT-compile and graphs capture there), a timed one,
    ``probe()`` if given (still enabled, after the timed run), ``disable`` and ``reset_compiled`` (also on error).

    Returns ``out`` (the timed call's output), ``E_ms``, ``P_ms``, ``D_ms`` (ms per generated token after the
    first: ``new_tokens - 1`` steps), ``marks`` (the timed call's ``time.perf_counter`` at its start and at the
    ends of E, P and D), ``kept`` (visual tokens kept by the last pruning; None when nothing was pruned, e.g. the
    stock row) and ``probe`` (what ``probe()`` returned, else None).
    """
    from . import disable, enable

    if sparsity is not None:
        enable(model, sparsity[0], sparsity[1], cuda_graph=cuda_graph, step_graph=step_graph)
    try:
        with torch.no_grad():
            timer.run(generate)
            out, t = timer.run(generate)
        state = getattr(model, "_sparsevila", None)
        kept = int(state.last_kept.numel()) if state is not None and state.last_kept is not None else None
        probed = probe() if probe is not None else None
    finally:
        if sparsity is not None:
            disable(model)
        reset_compiled(model)
    return {"out": out, "E_ms": t["E_ms"], "P_ms": t["P_ms"],
            "D_ms": 1e3 * (t["end"] - t["p_end"]) / max(new_tokens - 1, 1), "marks": t["marks"], "kept": kept,
            "probe": probed}


def run(device: Optional[str] = None, frames: int = 32, h: int = 28, w: int = 28, question: int = 64,
        new_tokens: int = 64, settings=((0.0, 0.0), (0.75, 0.95)), vanilla: bool = True, cuda_graph: bool = True,
        out_json: Optional[str] = None, model_name: str = "qwen2_5_vl") -> list:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = dev.type == "cuda"
    dtype = torch.bfloat16 if full else torch.float32
    if not full:
        frames, h, w, question, new_tokens = 4, 12, 12, 8, 8
    model = build_model(full, dev, dtype, model_name)
    inputs = video_inputs(model, frames, h, w, question, dev, dtype)
    n_vis = int((inputs["input_ids"] == model.config.video_token_id).sum())
    newline = ""
    if model_name == "llava_onevision":  # the video's trailing newline token is never pruned: not counted
        h = w = model.config.vision_config.image_size // 14
        n_vis, newline = n_vis - 1, " (and a newline)"
    title = {"qwen2_5_vl": "Qwen2.5-VL", "llava_onevision": "LLaVA-OneVision"}[model_name]
    print(f"{title} {'7B' if full else 'tiny'} ({dtype}, {dev}), random weights; video {frames} frames of "
          f"{h * 14}x{w * 14} px -> {n_vis} visual tokens{newline}; question {question} tokens; {new_tokens} new "
          f"tokens")
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rows = []
    timer = StageTimer(model)
    cases = ([("stock transformers (sdpa)", None)] if vanilla else []) + [(f"sparsevila ({p}, {d})", (p, d))
                                                                          for p, d in settings]
    for name, sp in cases:
        kw = dict(gen, cache_implementation="static") if sp is None and cuda_graph else gen
        r = stage_row(model, timer, lambda kw=kw: model.generate(**inputs, **kw), new_tokens, sp, cuda_graph=cuda_graph)
        kept = n_vis if r["kept"] is None else r["kept"]
        row = {"setting": name, "visual_tokens_kept": kept, "of": n_vis, "E_ms": round(r["E_ms"], 2),
               "P_ms": round(r["P_ms"], 2), "D_ms_per_token": round(r["D_ms"], 3), "generated": r["out"].shape[1] -
               inputs["input_ids"].shape[1]}
        rows.append(row)
        print(f"  {name:28s} kept {kept:6d}/{n_vis}  E {row['E_ms']:9.2f} ms  P {row['P_ms']:9.2f} ms  "
              f"D {row['D_ms_per_token']:8.3f} ms/token")
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if full else "cpu", "frames": frames, "h": h, "w": w,
                       "question": question, "new_tokens": new_tokens, "cuda_graph": cuda_graph, "rows": rows}, f,
                      indent=1)
    return rows


def main(argv=None, model: str = "qwen2_5_vl") -> int:
    p = argparse.ArgumentParser(prog=f"python -m sparsevila_ops demo --model {model}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--height", type=int, default=28, help="patches (14 px) per frame column (Qwen2.5-VL)")
    p.add_argument("--width", type=int, default=28, help="patches (14 px) per frame row (Qwen2.5-VL)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="decode eagerly (default on CUDA: a CUDA-graph decode step)")
    p.add_argument("--no-vanilla", action="store_true", help="skip the stock-transformers row")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.device is not None and (err := device_flag_error("--device", a.device)) is not None:
        p.error(err)
    for flag, val in (("--frames", a.frames), ("--height", a.height), ("--width", a.width)):
        if val < 2 or val % 2:
            p.error(f"{flag} must be an even number >= 2; got {val}")
    run(a.device, a.frames, a.height, a.width, new_tokens=a.new_tokens, vanilla=not a.no_vanilla,
        cuda_graph=not a.eager, out_json=a.json, model_name=model)
    return 0
