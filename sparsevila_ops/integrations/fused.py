"""Fused projections for Llama-family decoder layers (model-agnostic): one GEMV for q/k/v, one for gate/up.

At batch 1 a decode step is a chain of GEMVs that should stream the weights at copy bandwidth. Three small
ones (q, k, v: the k and v outputs are 512 rows on Qwen2.5-7B) leave the GPU half idle and need split-K
reduces; one GEMV over the concatenated weight does not (bench/NOTES.md, "Fused projections"). ``fuse(layers)``
gives each decoder layer's attention and MLP an instance-level ``forward`` over one concatenated weight; the
original ``q/k/v_proj`` and ``gate/up_proj`` weights become views into it, so no memory is added and the model's
parameters, ``state_dict`` and outputs are unchanged. ``unfuse(layers)`` removes the forwards (the weights stay
views, with the same values).

A layer is fused only when its projections are plain ``nn.Linear`` of one dtype and device without forward
hooks (quantized or hooked layers keep their own forward); replace or quantize linear layers while fusion is off.
"""
from __future__ import annotations

import types
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

QKV, GATE_UP = "_sparsevila_qkv", "_sparsevila_gate_up"


def _concat_into_views(linears: Sequence[nn.Linear]) -> Optional[tuple]:
    """``(weight, bias or None, split sizes)`` of the linears concatenated along the output dim; each linear's
    weight (and bias) is replaced by a view of it. None when they are not plain linears (without forward hooks,
    which a fused forward would skip) of one dtype/device with all or no biases."""
    if not all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in linears):
        return None
    ws = [m.weight for m in linears]
    has_bias = {m.bias is not None for m in linears}
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1 or len(has_bias) != 1:
        return None
    sizes = [w.shape[0] for w in ws]
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in ws], dim=0)
        bias = torch.cat([m.bias.detach() for m in linears], dim=0) if has_bias.pop() else None
    for m, wv in zip(linears, weight.split(sizes, dim=0)):
        m.weight = nn.Parameter(wv, requires_grad=m.weight.requires_grad)
    if bias is not None:
        for m, bv in zip(linears, bias.split(sizes, dim=0)):
            m.bias = nn.Parameter(bv, requires_grad=m.bias.requires_grad)
    return weight, bias, sizes


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                       past_key_values=None, position_embeddings=None, *, rope: Callable, **kwargs):
    """The Llama-family attention forward with ``q, k, v = split(x W_qkv^T + b_qkv)``."""
    weight, bias, sizes = self.__dict__[QKV]
    bsz, q_len, _ = hidden_states.shape
    q, k, v = F.linear(hidden_states, weight, bias).split(sizes, dim=-1)
    q, k, v = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                             sliding_window=getattr(self, "sliding_window", None), position_ids=position_ids,
                             **kwargs)
    return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``down(act(x W_gate^T) * (x W_up^T))`` with one GEMV for ``[W_gate; W_up]``."""
    weight, bias, sizes = self.__dict__[GATE_UP]
    gate, up = F.linear(x, weight, bias).split(sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse(layers: Iterable[nn.Module], rope: Callable) -> List[str]:
    """Fuse each decoder layer's ``self_attn`` q/k/v and ``mlp`` gate/up projections (module docstring);
    ``rope(q, k, cos, sin)`` is the model's rotary embedding. Returns what was fused (``"3.self_attn"``, ...)."""
    done = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.__dict__[QKV] = qkv
            attn.forward = types.MethodType(lambda self, *a, **kw: _attention_forward(self, *a, rope=rope, **kw),
                                            attn)
            done.append(f"{i}.self_attn")
        gate_up = _concat_into_views([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.__dict__[GATE_UP] = gate_up
            mlp.forward = types.MethodType(_mlp_forward, mlp)
            done.append(f"{i}.mlp")
    return done


def unfuse(layers: Iterable[nn.Module]) -> None:
    """Remove what ``fuse`` installed (the projections keep their weights, views of the fused tensors)."""
    for layer in layers:
        for module, name in ((layer.self_attn, QKV), (layer.mlp, GATE_UP)):
            if module.__dict__.pop(name, None) is not None:
                module.__dict__.pop("forward", None)
