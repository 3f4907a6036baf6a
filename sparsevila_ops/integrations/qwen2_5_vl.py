"""Qwen2.5-VL (the Cosmos-Reason1-7B architecture) through the SparseVILA pipeline, on HF transformers 5.17.

``enable(model, prefill_sparsity, decode_sparsity)`` changes only this model instance:

- **vision tower**: the patch embedding's Conv3d (kernel == stride) runs as one GEMM; on CUDA the RMSNorms, each
  with the residual add before it (``add_rms_norm``; the first block's ``norm1`` has none), and the rotary
  embedding of q and k run as one Triton kernel each (``triton_kernels/vision.py``) instead of chains of fp32
  kernels, and each block's MLP as two GEMMs over its 3420-wide intermediate padded to 3456 (``fused.fuse``);
  every block's ``attn`` gets an instance-level ``forward`` that runs the block's attention as one launch over
  all its segments instead of transformers' per-segment loop: a window block's (segments of at most 64 patches,
  CUDA, fp16 / bf16) with the rotary embedding inside (``window_attention``), the others through
  ``varlen_attention`` (batched SDPA for equal frames, our varlen ``prefill_attention`` else). With
  ``prefill_sparsity > 0`` the salience block (default: the last full-attention block) runs its attention with
  the LSE (``varlen_attention``: cuDNN's SDPA kernel for equal frames on CUDA, else ``prefill_attention``) and
  ``visual_salience(..., lse=...)``: one pass over QK^T.
- **generate**: an instance-level ``generate`` encodes the images/videos, undoes the window order, pools
  salience over the 2x2 merge unit, keeps the top ``1 - prefill_sparsity`` per image/video
  (``prune_visual_tokens``), and calls the original ``generate`` with the kept embeddings and their original
  3-D mRoPE positions (sliced from ``mrope_positions`` of the full sequence: ``get_rope_index``'s numbers without
  its host loop over every token; ``rope_deltas`` set for later turns); an unpruned first turn given
  ``mm_token_type_ids`` takes its positions from ``mrope_positions`` too. It passes a ``SparseVILACache`` and
  returns the caller's full ``input_ids`` followed by the new tokens, as vanilla ``generate`` does
  (``pipeline.generate`` with this model's ``_HOOKS``: the pruning above).
- **LLM decoder layers**: q/k/v and gate/up projections each run as one GEMV over a concatenated weight
  (``fused.fuse``; the original weights become views of it); on CUDA the RMSNorms run as one Triton kernel each
  and, in fp16 / bf16, a prefill's rotary embedding of q and k as one kernel each (the same bits as eager's).
- **LLM attention**: ``sparsevila_attention`` (``AttentionInterface``) for the text config: prefill with the
  question rows' relevance, select + pack of all layers, decode over the packed cache.

``disable(model)`` removes all of it.
"""
from __future__ import annotations

import functools
import types
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.vision_utils import get_vision_window_index

from ..salience import visual_salience
from ..select import prune_visual_tokens
from . import fused, pipeline
from .attention import segment_lengths, varlen_attention
from .fused import triton_elementwise
from .pipeline import PipelineState

__all__ = ["enable", "disable", "SparseVILAState"]


class SparseVILAState(PipelineState):
    """What ``enable`` attached to a model (``model._sparsevila``): the pipeline's state and the vision tower's."""

    def __init__(self, model, prefill_sparsity: float, decode_sparsity: float, salience_layer: int,
                 cuda_graph: bool, step_graph: bool = False):
        super().__init__(model, prefill_sparsity, decode_sparsity, cuda_graph, step_graph)
        self.salience_layer = salience_layer
        self.collect_salience = False
        self.salience_window_order: List[torch.Tensor] = []  # per visual() call, patch level, window order
        self._seg_lens: dict = {}  # id(cu_seqlens) -> (cu_seqlens, host lengths), for one vision forward
        self.pending_norm = fused.PendingNorm()  # a vision block's last add, fused with the RMSNorm after it

    def segment_lengths(self, cu_seqlens: torch.Tensor) -> List[int]:
        """Host segment lengths, one device sync per distinct ``cu_seqlens``: the tower hands the same frame and
        window tensors to all of its blocks."""
        hit = self._seg_lens.get(id(cu_seqlens))
        if hit is None or hit[0] is not cu_seqlens:
            hit = self._seg_lens[id(cu_seqlens)] = (cu_seqlens, segment_lengths(cu_seqlens))
        return hit[1]


def enable(model, prefill_sparsity: float = 0.75, decode_sparsity: float = 0.95, *,
           salience_layer: Optional[int] = None, cuda_graph: bool = True, step_graph: bool = False):
    """Run ``model.generate`` through the SparseVILA pipeline; returns ``model``.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration``.
        prefill_sparsity: fraction of each image's/video's visual tokens dropped before the LLM
            (query-agnostic, by vision-encoder salience); 0 keeps all.
        decode_sparsity: fraction of the visual KV entries (per layer and KV head) dropped for decoding
            after each question (query-aware, by the question rows' attention); 0 decodes over the full cache.
        salience_layer: the full-attention vision block whose attention scores salience (default: the last of
            ``vision_config.fullatt_block_indexes``).
        cuda_graph: report the cache compileable, so that ``generate`` on CUDA compiles the decode step into a
            CUDA graph (``torch.compile``, mode ``reduce-overhead``, on Hopper and later with inductor's
            programmatic dependent launch unless a ``compile_config`` is given: ``decode_compile``; the first
            ``generate`` of each cache size compiles, later calls reuse the cache's buffers and replay): 4-5x faster
            decode on a 7B model than eager (bench/NOTES.md). False decodes eagerly;
            ``generate(..., disable_compile=True)`` does for one call.
        step_graph: with ``cuda_graph``, inductor compiles the decode step without its CUDA-graph trees and the
            integration captures and replays it (``integrations.step_graph``: no dynamo guards or tree
            bookkeeping per token). On the H200 it halves the host's time per decode step (~1.8 -> ~0.95 ms);
            the 7B model's steps are GPU-bound, so its D stays within 2.5 %: it pays off where a step's GPU work
            is shorter than the host's. It needs the model on one device (a CUDA graph runs on one; a
            ``device_map`` split is refused), which need not be the current one.
    """
    prefill_sparsity, decode_sparsity = pipeline.check_enable(
        model, hf.Qwen2_5_VLForConditionalGeneration, prefill_sparsity, decode_sparsity, cuda_graph, step_graph)
    vcfg = model.config.vision_config
    full = list(vcfg.fullatt_block_indexes)
    if salience_layer is None:
        salience_layer = full[-1]
    if isinstance(salience_layer, bool) or not isinstance(salience_layer, int):
        raise TypeError(f"salience_layer must be an int; got {type(salience_layer).__name__}")
    if salience_layer not in full:
        kind = "a window-attention block" if 0 <= salience_layer < vcfg.depth else "not a vision block"
        raise ValueError(f"salience_layer must be a full-attention vision block (one of fullatt_block_indexes = "
                         f"{full}); got {salience_layer}, {kind}")
    state = SparseVILAState(model, prefill_sparsity, decode_sparsity, salience_layer, cuda_graph, bool(step_graph))
    pipeline.attach(model, state, _HOOKS)
    visual = model.model.visual
    for i, blk in enumerate(visual.blocks):
        blk.attn.forward = types.MethodType(functools.partial(_vision_attn_forward, state=state,
                                                              salience=(i == salience_layer)), blk.attn)
    for norm in _vision_norms(visual):
        norm.forward = types.MethodType(functools.partial(_vision_norm_forward, state=state), norm)
    for blk, next_norm in zip(visual.blocks, [b.norm1 for b in visual.blocks[1:]] + [visual.merger.ln_q]):
        blk.forward = types.MethodType(functools.partial(_vision_block_forward, state=state, next_norm=next_norm),
                                       blk)
    visual.forward = functools.partial(_visual_forward, visual.forward, state, visual)
    visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
    return model


def disable(model):
    """Undo ``enable``: vanilla attention, vision tower and ``generate``; returns ``model``."""
    pipeline.detach(model)
    visual = model.model.visual
    visual.__dict__.pop("forward", None)
    visual.patch_embed.__dict__.pop("forward", None)
    for blk in visual.blocks:
        blk.__dict__.pop("forward", None)
        blk.attn.__dict__.pop("forward", None)
    for norm in _vision_norms(visual):
        norm.__dict__.pop("forward", None)
    fused.unfuse(visual.blocks)
    return model


# -- vision tower ------------------------------------------------------------------------------------------
def _patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` as one GEMM: its Conv3d has kernel == stride over each flattened
    ``[C, T, P, P]`` patch, i.e. ``patches [N, C*T*P*P] @ weight.view(E, -1)^T`` (cuDNN runs it as a 3-D conv)."""
    w = self.proj.weight
    return F.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def _vision_attn_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                         position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                         max_seqlen=None, *, state: SparseVILAState, salience: bool, **kwargs) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` with the attention of all segments in one launch: for windows of at
    most ``WINDOW_MAX`` patches on CUDA in fp16 / bf16, with the rotary embedding (``window_attention``)."""
    from ..triton_kernels.vision import WINDOW_MAX
    T = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(T, 3, self.num_heads, -1)
    cos, sin = position_embeddings
    lens = state.segment_lengths(cu_seqlens)
    longest = max(lens, default=0)
    want = salience and state.collect_salience
    if (not want and 0 < longest <= WINDOW_MAX and qkv.dtype in (torch.float16, torch.bfloat16)
            and triton_elementwise(qkv)):
        from ..triton_kernels.vision import window_attention
        out = window_attention(qkv, cos, sin, cu_seqlens.to(torch.int32), longest, self.scaling)
        return self.proj(out.reshape(T, -1))
    q, k, v = qkv.unbind(1)
    if triton_elementwise(q):
        from ..triton_kernels.vision import rotary_qk
        q, k = rotary_qk(q, k, cos, sin)
    else:
        q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    out, lse = varlen_attention(q, k, v, cu_seqlens, lens, self.scaling, need_lse=want)
    if want:
        cu = cu_seqlens.to(torch.int32)
        state.salience_window_order.append(visual_salience(q, k, cu, longest, lse=lse, scale=self.scaling))
    return self.proj(out.reshape(T, -1))


def _vision_block_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                          position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *,
                          state: SparseVILAState, next_norm: torch.nn.Module, **kwargs) -> torch.Tensor:
    """``Qwen2_5_VLVisionBlock.forward`` with each residual add fused into the RMSNorm after it where
    :func:`triton_elementwise` allows (``add_rms_norm``): the attention's into ``norm2``, the MLP's into
    ``next_norm`` (the next block's ``norm1``, or the merger's ``ln_q``), whose forward then finds its output in
    ``state.pending_norm``. Each add and norm: 4 passes over the residual stream instead of 5."""
    if not (triton_elementwise(hidden_states, self.norm2.weight, next_norm.weight)
            and next_norm.weight.device == hidden_states.device):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    h = self.attn(self.norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    h, x = _add_rms_norm(hidden_states, h, self.norm2)
    out, x = _add_rms_norm(h, self.mlp(x), next_norm)
    state.pending_norm.put(next_norm, out, x)
    return out


def _add_rms_norm(x: torch.Tensor, r: torch.Tensor, norm: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + r, norm(x + r))``: one Triton kernel when x and r agree in shape and dtype, else eager's add."""
    if r.shape == x.shape and r.dtype == x.dtype:
        from ..triton_kernels.vision import add_rms_norm
        return add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
    s = x + r
    return s, fused.rms_norm_forward(norm, s)


def _vision_norm_forward(self, hidden_states: torch.Tensor, *, state: SparseVILAState) -> torch.Tensor:
    """A vision RMSNorm: the output the fused add before it left (``state.pending_norm``) when that add produced
    ``hidden_states``, else one Triton kernel where allowed (``fused.rms_norm_forward``)."""
    y = state.pending_norm.take(self, hidden_states)
    return fused.rms_norm_forward(self, hidden_states) if y is None else y


def _vision_norms(visual) -> list:
    """The vision tower's RMSNorms: each block's two and the merger's."""
    return [n for blk in visual.blocks for n in (blk.norm1, blk.norm2)] + [visual.merger.ln_q]


def _visual_forward(orig, state: SparseVILAState, visual, hidden_states, grid_thw, **kwargs):
    """The vision tower; when salience is collected, it is put back from window order to patch order (the
    tower's window order computed once, here, and handed to the tower)."""
    n_before = len(state.salience_window_order)
    if state.collect_salience:
        window_index, cu_window_seqlens = get_vision_window_index(grid_thw, visual.spatial_merge_size,
                                                                  visual.window_size, visual.patch_size)
        kwargs = dict(kwargs, window_index=window_index, cu_window_seqlens=cu_window_seqlens)
    try:
        out = orig(hidden_states, grid_thw, **kwargs)
    finally:
        state._seg_lens.clear()
        state.pending_norm.clear()
    if len(state.salience_window_order) > n_before:  # only while collecting
        sal = state.salience_window_order.pop()
        unit = visual.spatial_merge_unit
        reverse = torch.argsort(window_index.to(sal.device))
        state.salience_window_order.append(sal.view(-1, unit)[reverse].reshape(-1))
    return out


# -- generate ----------------------------------------------------------------------------------------------
_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def _fuse(model) -> None:
    """(Re-)fuse the decoder layers' projections and the vision blocks' MLPs, their 3420-wide intermediate padded
    (``fused.fuse``: cheap when nothing changed)."""
    fused.fuse(model.model.language_model.layers, hf.apply_rotary_pos_emb, hf.eager_attention_forward,
               standard_rope=True)  # Qwen2.5-VL's text rope: mrope sections are merged into cos / sin already
    fused.fuse(model.model.visual.blocks)


def _prune_prompt(model, state: SparseVILAState, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict):
    """Encode the visual inputs with salience, keep the top tokens per image/video, and build the pruned
    prompt: ``(ids [B, L'], mask [B, L'], inputs_embeds [B, L', H], position_ids [4, B, L'])``."""
    cfg, inner = model.config, model.model
    embeds = model.get_input_embeddings()(input_ids)
    keep_tok = mask.bool().clone()
    keep_ratio = 1.0 - state.prefill_sparsity
    unit = cfg.vision_config.spatial_merge_size ** 2
    kept_all, sal_all = [], []
    for pix_key, grid_key, token_id, fn in (("pixel_values", "image_grid_thw", cfg.image_token_id,
                                             inner.get_image_features),
                                            ("pixel_values_videos", "video_grid_thw", cfg.video_token_id,
                                             inner.get_video_features)):
        pix, grid = kwargs.get(pix_key), kwargs.get(grid_key)
        if pix is None:
            continue
        state.collect_salience = True
        try:
            feats = fn(pix, grid).pooler_output
        finally:
            state.collect_salience = False
        sal = state.salience_window_order.pop()
        feats = torch.cat(feats, dim=0).to(embeds.device, embeds.dtype)
        seg = (grid.prod(-1)).tolist()  # patches per image/video
        kept = prune_visual_tokens(sal.float(), seg, keep_ratio, group=unit)
        tok = input_ids == token_id
        if int(tok.sum()) != feats.shape[0]:
            raise ValueError(f"{grid_key} describes {feats.shape[0]} visual tokens but input_ids holds "
                             f"{int(tok.sum())} tokens of id {token_id}")
        embeds = embeds.masked_scatter(tok.unsqueeze(-1), feats)
        keep_vis = torch.zeros(feats.shape[0], dtype=torch.bool, device=input_ids.device)
        keep_vis[kept.to(input_ids.device)] = True
        keep_tok[tok] = keep_vis
        kept_all.append(kept)
        sal_all.append(sal)
    state.last_kept = torch.cat(kept_all) if kept_all else None
    state.last_salience = torch.cat(sal_all) if sal_all else None
    positions, _ = mrope_positions(model, input_ids, _mm_token_types(input_ids, cfg, kwargs), mask, kwargs)
    ids, new_mask, new_embeds, pos = pipeline.compact_prompt(input_ids, mask, keep_tok, embeds,
                                                             cfg.text_config.pad_token_id or 0, positions)
    # rope_deltas so that later tokens continue from the last position: pos = compacted index + delta
    model.model.rope_deltas = (pos.amax(dim=(0, 2)) + 1 - new_mask.sum(1).to(pos.device)).unsqueeze(1)
    text = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, new_mask, new_embeds, torch.cat([text[None], pos], dim=0)


def _prompt_positions(model, state: SparseVILAState, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict):
    """An unpruned first turn's ``position_ids [4, B, L]`` (text row, then mRoPE's three), as transformers'
    ``generate`` would build them, and ``rope_deltas`` set; None without ``mm_token_type_ids`` (transformers then
    numbers the tokens as text)."""
    types_ = kwargs.get("mm_token_type_ids")
    if types_ is None:
        return None
    positions, deltas = mrope_positions(model, input_ids, types_, mask, kwargs)
    model.model.rope_deltas = deltas
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.cat([text[None], positions], dim=0)


def mrope_positions(model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, mask: torch.Tensor,
                    kwargs: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """``Qwen2_5_VLModel.get_rope_index(input_ids, mm_token_type_ids, attention_mask=mask, **grids)``, the same
    ``(position_ids [3, B, L], rope_deltas [B, 1])``, with the runs of equal token types found on the device:
    transformers groups them in a Python loop over every token (~50 ms of host time at 131k tokens while the GPU
    idles). Per row, over its unmasked tokens: a text run continues ``p, p + 1, ...`` in all three rows; the i-th
    image or video run (grid ``t, h, w`` in ``image_grid_thw`` / ``video_grid_thw``, merge ``m``) takes
    ``(p + t' * dt, p + h', p + w')`` over its ``t x h/m x w/m`` tokens, ``dt = tokens_per_second *
    int(second_per_grid_ts[i])`` for videos (1 for images, and without ``second_per_grid_ts``), then ``p +=
    max(h, w) // m``; masked tokens stay 0; ``rope_deltas = max position + 1 - tokens``."""
    vcfg = model.config.vision_config
    merge, per_second = vcfg.spatial_merge_size, vcfg.tokens_per_second
    B, L = input_ids.shape
    dev = input_ids.device
    positions = torch.zeros(3, B, L, dtype=input_ids.dtype, device=dev)
    grids = {kind: [] if kwargs.get(key) is None else kwargs[key].tolist()
             for kind, key in ((1, "image_grid_thw"), (2, "video_grid_thw"))}
    seconds = kwargs.get("second_per_grid_ts")
    seconds = None if seconds is None else torch.as_tensor(seconds).tolist()
    taken = {1: 0, 2: 0}
    deltas = []
    for b in range(B):
        cols = torch.nonzero(mask[b]).flatten()  # the row's unmasked tokens
        types_ = mm_token_type_ids[b, cols]
        n = types_.numel()
        if n == 0:  # an all-padding row: nothing to number
            deltas.append(0)
            continue
        starts = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                            torch.nonzero(types_[1:] != types_[:-1]).flatten() + 1])
        runs = torch.stack([starts, types_[starts].long()]).tolist()  # [2, runs]
        pieces, p, top = [], 0, -1
        for s, e, kind in zip(runs[0], runs[0][1:] + [n], runs[1]):
            if kind == 0:
                pieces.append(torch.arange(p, p + e - s, device=dev).expand(3, -1))
                p, top = p + e - s, max(top, p + e - s - 1)
                continue
            key = "image_grid_thw" if kind == 1 else "video_grid_thw"
            if taken[kind] >= len(grids[kind]):
                raise ValueError(f"{key} has {len(grids[kind])} entries but row {b} of input_ids holds more "
                                 f"{'image' if kind == 1 else 'video'} token runs")
            t, h, w = grids[kind][taken[kind]]
            dt = 1
            if kind == 2:
                dt = per_second * int(seconds[taken[2]] if seconds is not None else 1)
            taken[kind] += 1
            gh, gw = h // merge, w // merge
            if e - s != t * gh * gw:
                raise ValueError(f"row {b} of input_ids has a run of {e - s} tokens of type {kind} where {key} "
                                 f"[{t}, {h}, {w}] describes {t * gh * gw}")
            tt, hh, ww = torch.meshgrid(torch.arange(t, device=dev) * dt + p, torch.arange(gh, device=dev) + p,
                                        torch.arange(gw, device=dev) + p, indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1))
            top = max(top, p + (t - 1) * dt, p + gh - 1, p + gw - 1)
            p += max(h, w) // merge
        positions[:, b, cols] = torch.cat(pieces, dim=1).to(positions.dtype)
        deltas.append(top + 1 - n)
    return positions, torch.tensor(deltas, device=dev).unsqueeze(1)


def _mm_token_types(input_ids: torch.Tensor, cfg, kwargs: dict) -> torch.Tensor:
    given = kwargs.get("mm_token_type_ids")
    if given is not None:
        return given
    types_ = torch.zeros_like(input_ids, dtype=torch.int32)
    types_[input_ids == cfg.image_token_id] = 1
    types_[input_ids == cfg.video_token_id] = 2
    return types_


_HOOKS = pipeline.Hooks(fuse=_fuse, prune_prompt=_prune_prompt, visual_kwargs=_VISUAL_KWARGS,
                        token_kwargs=("mm_token_type_ids",), prompt_positions=_prompt_positions)
