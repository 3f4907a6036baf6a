"""LLaVA-OneVision (SigLIP vision tower, Qwen2 LLM) through the SparseVILA pipeline, on HF transformers 5.17.

``enable(model, prefill_sparsity, decode_sparsity)`` changes only this model instance:

- **vision tower**: with ``prefill_sparsity > 0`` the salience layer (default: the last SigLIP layer whose output
  feeds the projector, ``vision_feature_layer``) runs its attention over all frames as one launch with the LSE
  (``varlen_attention``: cuDNN's SDPA kernel on CUDA, else ``prefill_attention``), and ``visual_salience(...,
  lse=...)`` scores each patch by the mean attention it receives in its frame: one more pass over QK^T. The other
  layers stay as transformers runs them (one batched SDPA over the frames), on contiguous activations: the patch
  embeddings are made contiguous (transformers' ``flatten(2).transpose(1, 2)`` leaves them permuted, and every
  residual add and LayerNorm of the tower would inherit that layout: a strided kernel or a copy each; on the H200
  at 669 frames they took ~0.44 s of a 2.26 s tower).
- **patch embedding and MLPs** on CUDA in bf16/fp16: the patch convolution as one GEMM over the gathered patches
  (``vit.patch_embedding_forward``: 24.7 -> 3.3 ms at 669 frames on the H200; cuDNN's convolution is slow at
  stride 14), which also leaves the embeddings contiguous, and each MLP's GELU in fc1's GEMM epilogue
  (``vit.gelu_mlp_forward``: 1.09x per MLP).
- **LayerNorms** of the tower: one Triton kernel each on CUDA (``triton_kernels.vision.layer_norm``; PyTorch's
  took 1.4 ms per call at 669 frames on the H200, 2.7x the bytes' time), each but the first with the residual add
  before it (``vit.encoder_layer_forward``: ``add_layer_norm``; the last layer's add with the post-LayerNorm).
- **video pooling** (``apply_pooling``): the same bilinear interpolation on a channels-last view of the features,
  which PyTorch runs with a thread per output element; on the contiguous NCHW copy transformers makes, its CUDA
  kernel gives each of the 14 x 14 output pixels one thread looping over frames x channels (0.93 s at 669 frames of
  3584 channels on the H200, 41 % of E).
- **generate** (``pipeline.generate`` with this model's hooks): a video's patch salience is pooled as its features
  are (bilinear, each frame's grid to ``ceil(h / 2) x ceil(w / 2)``, ``apply_pooling``), each video keeps its
  ``1 - prefill_sparsity`` most salient pooled tokens in order (``prune_visual_tokens``) and its trailing
  newline token, and the LLM gets the pruned prompt. The kept tokens are numbered contiguously: the LLM's 1-D
  RoPE positions follow the pruned prompt, as if the dropped tokens had never been in it. Images (anyres tiles
  with a newline per row) are not pruned: all their tokens stay.
- **LLM decoder layers**: q/k/v and gate/up projections each run as one GEMV over a concatenated weight
  (``fused.fuse``).
- **LLM attention**: ``sparsevila_attention`` for the text config: prefill with the question rows' relevance,
  select + pack of all layers, decode over the packed cache.

``disable(model)`` removes all of it.
"""
from __future__ import annotations

import functools
import math
import types
from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision import modeling_llava_onevision as hf
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.siglip import modeling_siglip as siglip

from ..salience import visual_salience
from ..select import prune_visual_tokens
from . import fused, pipeline, vit
from .attention import varlen_attention
from .pipeline import PipelineState

__all__ = ["enable", "disable", "LlavaOnevisionState"]


class LlavaOnevisionState(PipelineState):
    """What ``enable`` attached to a model (``model._sparsevila``): the pipeline's state and the salience layer's."""

    def __init__(self, model, prefill_sparsity: float, decode_sparsity: float, salience_layer: int,
                 cuda_graph: bool, step_graph: bool = False):
        super().__init__(model, prefill_sparsity, decode_sparsity, cuda_graph, step_graph)
        self.salience_layer = salience_layer
        self.collect_salience = False
        self.salience: List[torch.Tensor] = []  # per vision-tower call: patch salience [frames * patches]
        self.pending_norm = fused.PendingNorm()  # an encoder layer's last add, fused with the LayerNorm after it


def _vision_model(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def _encoder_layers(model):
    return _vision_model(model).encoder.layers


def _layer_norms(model) -> list:
    """The SigLIP tower's LayerNorms (each layer's two, the post-LayerNorm, a pooling head's)."""
    return [m for m in _vision_model(model).modules() if isinstance(m, torch.nn.LayerNorm)]


def _mlps(model) -> list:
    """The SigLIP tower's MLPs (each layer's, a pooling head's)."""
    return [m for m in _vision_model(model).modules() if isinstance(m, siglip.SiglipMLP)]


def _feature_layers(cfg, n_layers: int) -> List[int]:
    """The SigLIP layers whose outputs feed the projector: ``hidden_states[i]`` is layer ``i - 1``'s output."""
    picks = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) \
        else [cfg.vision_feature_layer]
    return [i % (n_layers + 1) - 1 for i in picks]


def enable(model, prefill_sparsity: float = 0.75, decode_sparsity: float = 0.95, *,
           salience_layer: Optional[int] = None, cuda_graph: bool = True, step_graph: bool = False):
    """Run ``model.generate`` through the SparseVILA pipeline; returns ``model``.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` (``vision_feature_select_strategy`` ``"full"``).
        prefill_sparsity: fraction of each video's pooled visual tokens dropped before the LLM (query-agnostic,
            by vision-encoder salience); 0 keeps all. Images are never pruned.
        decode_sparsity: fraction of the visual KV entries (per layer and KV head) dropped for decoding after
            each question (query-aware, by the question rows' attention); 0 decodes over the full cache.
        salience_layer: the SigLIP encoder layer whose attention scores salience (default: the last one whose
            output the projector reads).
        cuda_graph, step_graph: as ``integrations.qwen2_5_vl.enable``: the decode step compiled into CUDA graphs
            (inductor's trees, or with ``step_graph`` the integration's own).
    """
    prefill_sparsity, decode_sparsity = pipeline.check_enable(
        model, hf.LlavaOnevisionForConditionalGeneration, prefill_sparsity, decode_sparsity, cuda_graph, step_graph)
    cfg = model.config
    if cfg.vision_feature_select_strategy != "full":
        raise ValueError(f"vision_feature_select_strategy must be 'full' (every patch of a frame's square grid "
                         f"feeds the pooling); got {cfg.vision_feature_select_strategy!r}")
    layers = _encoder_layers(model)
    fed = [i for i in _feature_layers(cfg, len(layers)) if i >= 0]
    if salience_layer is None:
        if not fed:
            raise ValueError("the projector reads the patch embeddings only (vision_feature_layer 0): pass "
                             "salience_layer")
        salience_layer = max(fed)
    if isinstance(salience_layer, bool) or not isinstance(salience_layer, int):
        raise TypeError(f"salience_layer must be an int; got {type(salience_layer).__name__}")
    if not 0 <= salience_layer < len(layers):
        raise ValueError(f"salience_layer must be a SigLIP encoder layer in [0, {len(layers)}); got {salience_layer}")
    state = LlavaOnevisionState(model, prefill_sparsity, decode_sparsity, salience_layer, cuda_graph,
                                bool(step_graph))
    pipeline.attach(model, state, _HOOKS)
    attn = layers[salience_layer].self_attn
    attn.forward = types.MethodType(functools.partial(_salience_attn_forward, state=state), attn)
    embeddings = _vision_model(model).embeddings
    embeddings.forward = types.MethodType(_contiguous_embeddings_forward, embeddings)
    embeddings.patch_embedding.forward = types.MethodType(vit.patch_embedding_forward, embeddings.patch_embedding)
    for norm in _layer_norms(model):
        norm.forward = types.MethodType(functools.partial(vit.layer_norm_forward, pending=state.pending_norm), norm)
    final = getattr(_vision_model(model), "post_layernorm", None)
    for layer, next_norm in zip(layers, [layer.layer_norm1 for layer in layers[1:]] + [final]):
        layer.forward = types.MethodType(functools.partial(vit.encoder_layer_forward, next_norm=next_norm,
                                                           pending=state.pending_norm), layer)
    for mlp in _mlps(model):
        mlp.forward = types.MethodType(vit.gelu_mlp_forward, mlp)
    model.model.apply_pooling = types.MethodType(channels_last_pooling, model.model)
    return model


def disable(model):
    """Undo ``enable``: vanilla attention, vision tower, pooling and ``generate``; returns ``model``."""
    pipeline.detach(model)
    for layer in _encoder_layers(model):
        layer.__dict__.pop("forward", None)
        layer.self_attn.__dict__.pop("forward", None)
    embeddings = _vision_model(model).embeddings
    embeddings.__dict__.pop("forward", None)
    for name in ("forward", vit.PATCH_WEIGHT):
        embeddings.patch_embedding.__dict__.pop(name, None)
    for module in _layer_norms(model) + _mlps(model):
        module.__dict__.pop("forward", None)
    model.model.__dict__.pop("apply_pooling", None)
    return model


def _contiguous_embeddings_forward(self, *args, **kwargs) -> torch.Tensor:
    """``SiglipVisionEmbeddings.forward``, its output made contiguous (module doc): the same values, so the encoder
    layers' adds, LayerNorms and GEMMs read plain row-major activations (already so where the patch convolution
    runs as a GEMM, ``vit.patch_embedding_forward``)."""
    return type(self).forward(self, *args, **kwargs).contiguous()


POOL_MAX_NUMEL = 2 ** 31 - 1  # PyTorch's channels-last bilinear kernel takes fewer elements per call (int indices)


def channels_last_pooling(self, image_features: torch.Tensor) -> torch.Tensor:
    """``LlavaOnevisionModel.apply_pooling``: each frame's ``side x side`` grid of features ``[frames, side * side,
    dim]`` to ``ceil(side / 2)`` squared, bilinear, as transformers computes it, but on a channels-last view (no
    NCHW copy; PyTorch's channels-last kernel, module doc), in chunks of frames of fewer than ``POOL_MAX_NUMEL``
    elements."""
    side = self.config.vision_config.image_size // self.config.vision_config.patch_size
    frames, _, dim = image_features.shape
    grid = image_features.view(frames, side, side, dim).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
    half = math.ceil(side / 2)
    step = max(1, (POOL_MAX_NUMEL - 1) // (side * side * dim))
    chunks = [F.interpolate(grid[f:f + step], size=[half, half], mode="bilinear").permute(0, 2, 3, 1)
              for f in range(0, frames, step)]  # channels-last outputs: [n, half, half, dim] row-major views
    pooled = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # one chunk: no copy
    return pooled.reshape(frames, half * half, dim)


def _fuse(model) -> None:
    """(Re-)fuse the decoder layers' projections (``fused.fuse``: cheap when nothing changed)."""
    fused.fuse(model.model.language_model.layers, qwen2.apply_rotary_pos_emb, qwen2.eager_attention_forward,
               standard_rope=True)


def _salience_attn_forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                           state: LlavaOnevisionState, **kwargs):
    """``SiglipAttention.forward`` of the salience layer: while salience is collected, the attention of all frames
    ``[frames, N, C]`` as one launch with the LSE (``varlen_attention``), then ``visual_salience`` from it."""
    if not state.collect_salience or attention_mask is not None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    frames, n, c = hidden_states.shape
    q, k, v = (p(hidden_states).view(frames * n, self.num_heads, self.head_dim)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    cu = torch.arange(0, (frames + 1) * n, n, dtype=torch.int32, device=hidden_states.device)
    out, lse = varlen_attention(q, k, v, cu, [n] * frames, self.scale, need_lse=True)
    state.salience.append(visual_salience(q, k, cu, n, lse=lse, scale=self.scale))
    return self.out_proj(out.reshape(frames, n, c)), None


def pool_salience(salience: torch.Tensor, frames: int, side: int) -> torch.Tensor:
    """Patch salience ``[frames * side * side]`` pooled as LLaVA-OneVision pools a frame's features
    (``apply_pooling``: bilinear to ``ceil(side / 2)`` squared): ``[frames * ceil(side / 2) ** 2]``."""
    half = math.ceil(side / 2)
    grid = salience.float().view(frames, 1, side, side)
    return F.interpolate(grid, size=[half, half], mode="bilinear").reshape(-1)


def _prune_prompt(model, state: LlavaOnevisionState, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict):
    """Encode the images (whole) and videos (with salience), keep each video's most salient pooled tokens and its
    newline, and build the pruned prompt: ``(ids, mask, inputs_embeds, None)`` (positions follow the mask)."""
    cfg, inner = model.config, model.model
    embeds = model.get_input_embeddings()(input_ids)
    keep_tok = mask.bool().clone()
    state.last_kept = state.last_salience = None  # set below when a video is pruned
    images = kwargs.get("pixel_values")
    if images is not None:
        feats = inner.get_image_features(images, kwargs.get("image_sizes"),
                                         batch_num_images=kwargs.get("batch_num_images")).pooler_output
        embeds = _scatter(embeds, input_ids, cfg.image_token_id, torch.cat(feats, dim=0), "pixel_values")
    videos = kwargs.get("pixel_values_videos")
    if videos is not None:
        n_videos, frames = videos.shape[:2]
        state.collect_salience = True
        try:
            feats = inner.get_video_features(videos).pooler_output  # [videos, frames * pooled, hidden]
        finally:
            state.collect_salience = False
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        sal = pool_salience(state.salience.pop(), n_videos * frames, side)
        per_video = feats.shape[1]
        kept = prune_visual_tokens(sal, [per_video] * n_videos, 1.0 - state.prefill_sparsity)
        newline = inner.image_newline[None, None, :].expand(n_videos, 1, -1).to(feats.dtype)
        feats = torch.cat([feats, newline], dim=1).flatten(0, 1)
        keep_vis = torch.zeros(n_videos, per_video + 1, dtype=torch.bool, device=input_ids.device)
        keep_vis.view(-1)[(kept + kept // per_video).to(input_ids.device)] = True  # skip each earlier newline
        keep_vis[:, -1] = True
        embeds = _scatter(embeds, input_ids, cfg.video_token_id, feats, "pixel_values_videos")
        keep_tok[input_ids == cfg.video_token_id] = keep_vis.flatten()
        state.last_kept, state.last_salience = kept, sal
    ids, new_mask, new_embeds, _ = pipeline.compact_prompt(input_ids, mask, keep_tok, embeds,
                                                             cfg.text_config.pad_token_id or 0)
    return ids, new_mask, new_embeds, None


def _scatter(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, feats: torch.Tensor,
             name: str) -> torch.Tensor:
    tok = input_ids == token_id
    if int(tok.sum()) != feats.shape[0]:
        raise ValueError(f"{name} gives {feats.shape[0]} visual tokens but input_ids holds {int(tok.sum())} "
                         f"tokens of id {token_id}")
    return embeds.masked_scatter(tok.unsqueeze(-1), feats.to(embeds.device, embeds.dtype))


_HOOKS = pipeline.Hooks(fuse=_fuse, prune_prompt=_prune_prompt,
                        visual_kwargs=("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos",
                                       "batch_num_images"))
