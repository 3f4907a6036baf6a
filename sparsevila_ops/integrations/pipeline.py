"""The SparseVILA ``generate`` of a vision-language model, shared by the model integrations (model-agnostic).

A model's integration (``qwen2_5_vl``) keeps what is its own: its vision tower (salience, one launch per
attention block) and how it prunes a prompt. ``generate`` here is the rest, the same for every model whose HF
``generate`` takes ``input_ids`` with image / video tokens (``config.image_token_id`` / ``video_token_id``), the
visual inputs as keywords (``pixel_values``, ``pixel_values_videos``, ...) and a text config:

- checks what the cache cannot do (beam search, assisted decoding, right padding, another cache type);
- takes the model's ``SparseVILACache`` (a new one, or the previous call's emptied, ``PipelineState.new_cache``),
  or the caller's from an earlier turn;
- on a first turn with visual inputs and ``prefill_sparsity > 0`` prunes the prompt through the model's
  ``Hooks.prune_prompt`` (the cache remembers the pruning, so a later turn drops the same tokens);
- tells the cache the new rows' padding and visual spans, runs the original ``generate`` on our cache (the decode
  step compiled as ``decode_compile`` says, the stop check deferred) and gives back the caller's prompt followed by
  the new tokens, as vanilla ``generate`` does.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from transformers import AttentionInterface

from . import fused
from .attention import ATTN_NAME, LLMState, sparsevila_attention
from .cache import SparseVILACache, deferred_stop_checks
from .decode_compile import with_decode_compile
from .step_graph import StepGraphs, install, uninstall

PIXEL_KWARGS = ("pixel_values", "pixel_values_videos")  # a call with either has visual inputs


@dataclass(frozen=True)
class Hooks:
    """What ``generate`` asks of a model's integration.

    fuse(model): (re-)fuse the model's projections before each call (the weights may have moved since enable).
    prune_prompt(model, state, input_ids, mask, kwargs) -> (ids, mask, inputs_embeds, position_ids or None): encode
        the visual inputs with salience and build the pruned, left-padded prompt.
    visual_kwargs: the visual inputs' keywords, dropped once pruned and on later turns (in the cache already).
    token_kwargs: per-token keywords that follow ``input_ids``, dropped with a pruned prompt.
    prompt_positions(model, state, input_ids, mask, kwargs) -> position_ids or None: an unpruned first turn's
        positions, as the model's own ``generate`` would build them (None: let it), for models whose own way
        is slow (Qwen2.5-VL's mRoPE numbering loops over every token on the host).
    """
    fuse: Callable
    prune_prompt: Callable
    visual_kwargs: Tuple[str, ...]
    token_kwargs: Tuple[str, ...] = ()
    prompt_positions: Optional[Callable] = None


def check_enable(model, model_class: type, prefill_sparsity, decode_sparsity, cuda_graph: bool,
                 step_graph: bool) -> Tuple[float, float]:
    """``enable``'s checks of what every model shares; returns the two sparsities as floats."""
    if not isinstance(model, model_class):
        raise TypeError(f"model must be a transformers {model_class.__name__}; got {type(model).__name__}")
    if getattr(model, "_sparsevila", None) is not None:
        raise RuntimeError("sparsevila is already enabled on this model; call disable(model) first")
    if step_graph and not cuda_graph:
        raise ValueError("step_graph captures the compiled decode step: it needs cuda_graph=True")
    devices = {p.device for p in model.parameters()} if step_graph else set()
    if len(devices) > 1:
        raise ValueError("step_graph captures the decode step as one CUDA graph, which runs on one device; the "
                         f"model's parameters are on {', '.join(sorted(map(str, devices)))} (a device_map split): "
                         "use cuda_graph=True without step_graph")
    return check_sparsity("prefill_sparsity", prefill_sparsity), check_sparsity("decode_sparsity", decode_sparsity)


def attach(model, state: "PipelineState", hooks: Hooks) -> None:
    """The LLM side of ``enable``: ``state`` as ``model._sparsevila``, ``sparsevila_attention`` for the text
    config, the fused projections, ``generate`` through :func:`generate` with ``hooks`` (and the decode step's own
    graphs with ``state.step_graph``)."""
    model._sparsevila = state
    if state.step_graph:
        install(model, state.graphs_of)
    AttentionInterface.register(ATTN_NAME, sparsevila_attention)
    model.set_attn_implementation({"text_config": ATTN_NAME})
    for layer in model.model.language_model.layers:
        layer.self_attn._sparsevila_state = state.llm
    for norm in fused.rms_norms(model.model.language_model):
        norm.forward = types.MethodType(fused.rms_norm_forward, norm)
    hooks.fuse(model)
    model.generate = functools.partial(generate, model.generate, model, hooks)


def detach(model) -> "PipelineState":
    """Undo :func:`attach`; returns the state it removed."""
    state = getattr(model, "_sparsevila", None)
    if state is None:
        raise RuntimeError("sparsevila is not enabled on this model")
    model.__dict__.pop("generate", None)
    uninstall(model)
    for layer in model.model.language_model.layers:
        layer.self_attn.__dict__.pop("_sparsevila_state", None)
    for norm in fused.rms_norms(model.model.language_model):
        norm.__dict__.pop("forward", None)
    fused.unfuse(model.model.language_model.layers)
    model.set_attn_implementation({"text_config": state.prev_attn})
    model._sparsevila = None
    return state


def check_sparsity(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1); got {type(x).__name__}")
    if not 0.0 <= float(x) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of visual tokens dropped); got {x}")
    return float(x)


class PipelineState:
    """What ``enable`` attached to a model (``model._sparsevila``), the part ``generate`` uses; an integration
    subclasses it with its vision tower's state."""

    def __init__(self, model, prefill_sparsity: float, decode_sparsity: float, cuda_graph: bool,
                 step_graph: bool = False):
        self.prefill_sparsity, self.decode_sparsity = prefill_sparsity, decode_sparsity
        self.cuda_graph, self.step_graph = cuda_graph, step_graph
        self.step_graphs: Optional[StepGraphs] = None  # the decode step's own graphs (step_graph)
        self.text_config = model.config.text_config
        self.llm = LLMState(self.text_config.num_hidden_layers)
        self._graph_cache: Optional[SparseVILACache] = None  # reused by new_cache while cuda_graph
        self.prev_attn = model.config.text_config._attn_implementation
        self.last_kept: Optional[torch.Tensor] = None  # visual-token indices kept by the last pruning
        self.last_salience: Optional[torch.Tensor] = None  # salience of the last pruning's visual tokens

    def new_cache(self, like: torch.Tensor, capacity: int) -> SparseVILACache:
        """The cache of a ``generate`` called without one. With ``cuda_graph`` it is the previous such call's,
        emptied, while it holds ``capacity`` tokens and matches ``like``'s batch size, dtype, device and inference
        mode (as transformers reuses its static cache): captured decode graphs replay on fixed buffer addresses, so
        a new cache per call would record new graphs every call. A cache the caller got back (``hand_out``) is
        never reused; the kept one stays allocated until ``disable``."""
        text = self.text_config
        old = self._graph_cache
        if (self.cuda_graph and old is not None and old.capacity >= capacity and old.allocated
                and (old.batch_size_, old.k.dtype, old.k.device) == (like.shape[0], like.dtype, like.device)
                and old.k.is_inference() == torch.is_inference_mode_enabled()):  # inference tensors stay inside
            old.reset()
            return old
        cache = SparseVILACache(text.num_hidden_layers, capacity, 1.0 - self.decode_sparsity,
                                cuda_graph=self.cuda_graph)
        if self.cuda_graph:
            self._graph_cache = cache
        return cache

    def graphs_of(self, model, compiled, compile_config):
        """``generate``'s compiled decode step (``step_graph.install``): the one ``StepGraphs`` over it when
        inductor compiled it capturing nothing (``decode_compile_config(..., cudagraphs=False)``), else
        ``compiled`` itself."""
        if compile_config is None or compile_config.mode is not None \
                or (compile_config.options or {}).get("triton.cudagraphs") is not False:
            return compiled
        if self.step_graphs is None or self.step_graphs.fn is not compiled:
            self.step_graphs = StepGraphs(compiled)
            self.step_graphs.begin(model)
        return self.step_graphs

    def hand_out(self, cache: SparseVILACache) -> None:
        """``cache`` goes back to the caller (``return_dict_in_generate``), who may continue from it: never reuse it."""
        if self._graph_cache is cache:
            self._graph_cache = None


@torch.no_grad()  # as transformers' generate: pruning's encoder forward must not record an autograd graph
def generate(orig_generate, model, hooks: Hooks, input_ids: Optional[torch.Tensor] = None, **kwargs):
    """``model.generate`` while enabled (module doc): ``orig_generate`` is the model's own."""
    state: PipelineState = model._sparsevila
    hooks.fuse(model)  # the weights may have been replaced or moved since enable
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None or "inputs_embeds" in kwargs:
        raise ValueError("input_ids must be given (inputs_embeds is not supported while sparsevila is enabled)")
    gen_cfg = kwargs.get("generation_config") or model.generation_config
    for name in ("num_beams", "num_return_sequences"):
        if int(kwargs.get(name, getattr(gen_cfg, name, 1) or 1)) != 1:
            raise ValueError(f"{name} must be 1 while sparsevila is enabled (the cache holds one row per prompt)")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise ValueError("assisted decoding is not supported while sparsevila is enabled")
    B, L = input_ids.shape
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids) if mask is None else mask
    left_pads(mask)  # refuses right padding before anything runs
    cache = kwargs.pop("past_key_values", None)
    max_new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
    if max_new is None:
        max_new = max(int(kwargs.get("max_length", gen_cfg.max_length)) - L, 0)
    cfg = model.config
    like = like_kv(model, B, input_ids.device)
    if cache is None:
        cache = state.new_cache(like, L + max_new)
        if kwargs.get("return_dict_in_generate", gen_cfg.return_dict_in_generate):
            state.hand_out(cache)  # the caller gets it: a later call must not empty it
    elif not isinstance(cache, SparseVILACache):
        raise TypeError(f"past_key_values must be the SparseVILACache returned by an earlier generate (or None) "
                        f"while sparsevila is enabled; got {type(cache).__name__}")
    seen = int(cache.get_seq_length())
    has_visual = any(kwargs.get(key) is not None for key in PIXEL_KWARGS)
    call_ids, call_mask = input_ids, mask
    if seen == 0 and has_visual and state.prefill_sparsity > 0:
        call_ids, call_mask, embeds, positions = hooks.prune_prompt(model, state, input_ids, mask, kwargs)
        for key in hooks.visual_kwargs + hooks.token_kwargs:
            kwargs.pop(key, None)
        kwargs["inputs_embeds"] = embeds
        if positions is not None:
            kwargs["position_ids"] = positions
        cache.prompt_map = (L, call_ids, call_mask)
    elif seen == 0 and has_visual and hooks.prompt_positions is not None and kwargs.get("position_ids") is None:
        positions = hooks.prompt_positions(model, state, input_ids, mask, kwargs)
        if positions is not None:
            kwargs["position_ids"] = positions
    elif seen > 0:
        for key in hooks.visual_kwargs:  # the visual tokens of earlier turns are in the cache already
            kwargs.pop(key, None)
        if cache.prompt_map is not None:  # the cache holds the pruned prompt: drop the same tokens again
            L1, ids1, mask1 = cache.prompt_map
            call_ids = torch.cat([ids1, input_ids[:, L1:]], dim=1)
            call_mask = torch.cat([mask1, mask[:, L1:]], dim=1)
            for key in hooks.token_kwargs:
                kwargs.pop(key, None)
    new = call_mask[:, seen:]
    pads = left_pads(new)
    spans = visual_spans(call_ids[:, seen:], pads, cfg)
    cache.begin_prefill(like, new.shape[1], pads, spans, reserve=max_new)
    state.llm.cache = cache
    try:
        with deferred_stop_checks():
            kwargs = with_decode_compile(kwargs, gen_cfg, like.device, state.cuda_graph, state.step_graph)
            if state.step_graphs is not None:
                state.step_graphs.begin(model)
            out = orig_generate(input_ids=call_ids, attention_mask=call_mask, past_key_values=cache, **kwargs)
        cache.sync_full()
    finally:
        state.llm.cache = None
        cache.prefill = None
    return restore_prompt(out, input_ids, call_ids.shape[1])


def like_kv(model, B: int, device) -> torch.Tensor:
    """An empty ``[B, Hk, 0, D]`` tensor with the text model's KV dtype and device (for cache allocation)."""
    t = model.config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return torch.empty(B, t.num_key_value_heads, 0, head_dim, dtype=model.dtype, device=device)


def left_pads(mask: torch.Tensor) -> List[int]:
    """Leading zeros per row of a ``[B, n]`` 0/1 mask; padding anywhere else is refused (one device sync)."""
    valid = mask.bool()
    pads = (~valid).long().cumprod(dim=1).sum(dim=1)
    holes = (mask.shape[1] - pads) - valid.sum(dim=1)  # zeros after the row's first token
    pads, holes = torch.stack([pads, holes]).tolist()
    for b, h in enumerate(holes):
        if h:
            raise ValueError(f"attention_mask row {b} has padding after its first token: sparsevila supports "
                             f"left padding only (tokenizer padding_side='left')")
    return pads


def visual_spans(ids: torch.Tensor, pads: List[int], cfg) -> Optional[List[Tuple[int, int]]]:
    """Per row, ``[vs, ve)`` from the first to past the last image/video token, relative to the row's first
    valid token (``(0, 0)`` for a row without visual tokens); None when no row has one (a later turn's question:
    the cache keeps the spans it has). One device sync."""
    vis = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    col = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    live = vis & (col >= torch.tensor(pads, device=ids.device)[:, None])
    first = torch.where(live, col, ids.shape[1]).amin(dim=1)
    last = torch.where(live, col, -1).amax(dim=1)
    has_vis, first, last = torch.stack([vis.any(dim=1).long(), first, last]).tolist()
    if not any(has_vis):
        return None
    return [(f - pad, e + 1 - pad) if e >= 0 else (0, 0) for f, e, pad in zip(first, last, pads)]


def restore_prompt(out, input_ids: torch.Tensor, n_call: int):
    """Generated sequences as vanilla ``generate`` returns them: the caller's prompt, then the new tokens."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    full = torch.cat([input_ids, seq[:, n_call:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def compact_prompt(input_ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, embeds: torch.Tensor,
                   pad_id: int, positions: Optional[torch.Tensor] = None):
    """A pruned prompt: per row the tokens where ``keep [B, L]`` is set, in order, left-padded to the longest row
    (``pad_id``, mask 0). Returns ``(ids [B, L'], mask [B, L'], embeds [B, L', H], positions [..., B, L'] or
    None)``, ``positions [..., B, L]`` compacted the same way."""
    counts = keep.sum(1).tolist()
    B, Lp = input_ids.shape[0], max(counts)
    ids = input_ids.new_full((B, Lp), pad_id)
    new_mask = mask.new_zeros(B, Lp)
    new_embeds = embeds.new_zeros(B, Lp, embeds.shape[-1])
    pos = None if positions is None else positions.new_zeros(*positions.shape[:-2], B, Lp)
    for b, n in enumerate(counts):
        sel = keep[b]
        ids[b, Lp - n:] = input_ids[b, sel]
        new_mask[b, Lp - n:] = 1
        new_embeds[b, Lp - n:] = embeds[b, sel]
        if pos is not None:
            pos[..., b, Lp - n:] = positions[..., b, sel]
    return ids, new_mask, new_embeds, pos
