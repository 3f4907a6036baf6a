"""Fused projections for Llama-family decoder layers (model-agnostic): one GEMV for q/k/v, one for gate/up.

At batch 1 a decode step is a chain of GEMVs that should stream the weights at copy bandwidth. Three small
ones (q, k, v: the k and v outputs are 512 rows on Qwen2.5-7B) leave the GPU half idle and need split-K
reduces; one GEMV over the concatenated weight does not (bench/NOTES.md, "Decode without the per-step sync").
``fuse(layers)`` gives each decoder layer's attention and MLP an instance-level ``forward`` over one concatenated
weight; the original ``q/k/v_proj`` and ``gate/up_proj`` weights become views into it, so no memory is added and
the model's parameters, ``state_dict`` and outputs are unchanged. ``unfuse(layers)`` removes the forwards and
gives each projection its own storage again.

A group is fused only when its projections are plain ``nn.Linear`` of one dtype and device with materialized
weights, without hooks or wrapped forwards (quantized, hooked or offloaded layers keep their own forward). The
fused weight is a separate tensor: ``fuse`` called again (the integration does, before every ``generate``)
re-fuses a group whose projection weights are no longer its views (``load_state_dict(assign=True)``, ``.to()``)
and unfuses one that stopped qualifying (e.g. replaced by a quantized module). With autograd recording and
trainable weights the forwards run the original projections, so gradients reach them.
"""
from __future__ import annotations

import types
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

QKV, GATE_UP = "_sparsevila_qkv", "_sparsevila_gate_up"


def _fusable(linears: Sequence[nn.Module]) -> bool:
    """Plain linears of one dtype, device and input size, all or none with bias, materialized, without hooks or
    an instance-level (wrapped) forward."""
    if not all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
               and "forward" not in m.__dict__ and not hasattr(m, "_hf_hook") and not m.weight.is_meta
               for m in linears):
        return False
    ws = [m.weight for m in linears]
    return len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1 and len({m.bias is None for m in linears}) == 1


def _current(linears: Sequence[nn.Module], fused: Optional[tuple]) -> bool:
    """Whether the linears' weights (and biases) are still the views of ``fused`` that ``_concat_into_views`` made."""
    if fused is None:
        return False
    weight, bias, _ = fused
    same = lambda t, base: t is not None and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # noqa: E731
    return all(same(m.weight, weight) and (bias is None or same(m.bias, bias)) for m in linears)


def _concat_into_views(linears: Sequence[nn.Linear]) -> tuple:
    """``(weight, bias or None, split sizes)`` of the linears concatenated along the output dim; each linear's
    weight (and bias) is replaced by a view of it."""
    sizes = [m.weight.shape[0] for m in linears]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears], dim=0)
        bias = torch.cat([m.bias.detach() for m in linears], dim=0) if linears[0].bias is not None else None
    for m, wv in zip(linears, weight.split(sizes, dim=0)):
        m.weight = nn.Parameter(wv, requires_grad=m.weight.requires_grad)
    if bias is not None:
        for m, bv in zip(linears, bias.split(sizes, dim=0)):
            m.bias = nn.Parameter(bv, requires_grad=m.bias.requires_grad)
    return weight, bias, sizes


def _own_storage(linears: Sequence[nn.Linear]) -> None:
    """Give each linear's weight and bias a storage of its own (no longer views of one fused tensor)."""
    with torch.no_grad():
        for m in linears:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)


def _project(module: nn.Module, x: torch.Tensor, names: Sequence[str], state: str) -> List[torch.Tensor]:
    """The outputs of ``module``'s projections ``names`` on ``x``: one fused linear, or the projections
    themselves while autograd records into trainable weights (the fused weight is detached)."""
    if torch.is_grad_enabled() and getattr(module, names[0]).weight.requires_grad:
        return [getattr(module, n)(x) for n in names]
    weight, bias, sizes = module.__dict__[state]
    return list(F.linear(x, weight, bias).split(sizes, dim=-1))


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                       past_key_values=None, position_embeddings=None, *, rope: Callable, eager: Callable,
                       **kwargs):
    """The Llama-family attention forward with ``q, k, v = split(x W_qkv^T + b_qkv)``."""
    bsz, q_len, _ = hidden_states.shape
    q, k, v = _project(self, hidden_states, ("q_proj", "k_proj", "v_proj"), QKV)
    q, k, v = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             sliding_window=getattr(self, "sliding_window", None), position_ids=position_ids,
                             **kwargs)
    return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``down(act(x W_gate^T) * (x W_up^T))`` with one GEMV for ``[W_gate; W_up]``."""
    gate, up = _project(self, x, ("gate_proj", "up_proj"), GATE_UP)
    return self.down_proj(self.act_fn(gate) * up)


def _groups(layer: nn.Module, rope: Callable, eager: Callable):
    """(module, projection names, state attribute, forward) of a decoder layer's two fusable groups."""
    attn_forward = lambda self, *a, **kw: _attention_forward(self, *a, rope=rope, eager=eager, **kw)  # noqa: E731
    return ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), QKV, attn_forward),
            (layer.mlp, ("gate_proj", "up_proj"), GATE_UP, _mlp_forward))


def fuse(layers: Iterable[nn.Module], rope: Callable, eager: Callable) -> List[str]:
    """Fuse (or re-fuse, or unfuse, as the module docstring says) each decoder layer's ``self_attn`` q/k/v and
    ``mlp`` gate/up projections; ``rope(q, k, cos, sin)`` is the model's rotary embedding, ``eager`` its eager
    attention (for ``_attn_implementation == "eager"``). Returns the fused groups (``"3.self_attn"``, ...)."""
    done = []
    for i, layer in enumerate(layers):
        for module, names, state, forward in _groups(layer, rope, eager):
            linears = [getattr(module, n) for n in names]
            if not _fusable(linears):
                _drop(module, state)
                continue
            if not _current(linears, module.__dict__.get(state)):
                module.__dict__[state] = _concat_into_views(linears)
                module.forward = types.MethodType(forward, module)
            done.append(f"{i}.{'self_attn' if state == QKV else 'mlp'}")
    return done


def _drop(module: nn.Module, state: str) -> None:
    if module.__dict__.pop(state, None) is not None:
        module.__dict__.pop("forward", None)


def unfuse(layers: Iterable[nn.Module]) -> None:
    """Remove what ``fuse`` installed; projections that were views of a fused weight get their own storage."""
    for layer in layers:
        for module, names, state, _ in _groups(layer, None, None):
            fused = module.__dict__.get(state)
            linears = [getattr(module, n) for n in names]
            if fused is not None and all(isinstance(m, nn.Linear) for m in linears) and _current(linears, fused):
                _own_storage(linears)
            _drop(module, state)
