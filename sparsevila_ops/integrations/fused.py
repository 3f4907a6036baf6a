"""Fused projections for Llama-family decoder layers and gated-MLP encoder blocks (model-agnostic): one GEMV for
q/k/v, one for gate/up.

At batch 1 a decode step is a chain of GEMVs that should stream the weights at copy bandwidth. Three small
ones (q, k, v: the k and v outputs are 512 rows on Qwen2.5-7B) leave the GPU half idle and need split-K
reduces; one GEMV over the concatenated weight does not (bench/NOTES.md, "Decode without the per-step sync").
``fuse(layers)`` gives each decoder layer's attention and MLP an instance-level ``forward`` over one concatenated
weight; the original ``q/k/v_proj`` and ``gate/up_proj`` weights become views into it, so no memory is added and
the model's parameters, ``state_dict`` and outputs are unchanged. ``unfuse(layers)`` removes the forwards and
gives each projection its own storage again.

A group is fused only when its projections are plain ``nn.Linear`` of one dtype and device with materialized
weights, or 4-bit ``W4Linear`` layers (the ``[quant]`` extra) of one group size, without hooks or wrapped forwards
(hooked or offloaded layers keep their own forward). 4-bit groups are never padded; their packed weights become
views of the fused one and their scales and zeros (3 % of the bytes) are copied, re-fused when changed in place. The
fused weight is a separate tensor: ``fuse`` called again (the integration does, before every ``generate``)
re-fuses a group whose projection weights are no longer its views (``load_state_dict(assign=True)``, ``.to()``)
and unfuses one that stopped qualifying (e.g. replaced by a quantized module). With autograd recording and
trainable weights the forwards run the original projections, so gradients reach them.

At batch 1 on a GPU where the cuda backend runs, every linear of these forwards (fused q/k/v, o, fused gate/up,
down) is one :func:`sparsevila_ops.gemv` launch instead of cuBLAS's (faster at these sizes, no split-K reduce
kernels), the gate/up one emitting ``silu(gate) * up`` itself (``glu``), so a SiLU MLP needs no element-wise kernel
(``_decode_gemv`` says when). A 4-bit fused gate/up does the same through ``w4a16_linear(..., glu=True)`` at decode
sizes where that op's cuda backend runs (``_decode_w4_glu``). With ``fuse(..., standard_rope=True)`` a decode step
into a ``SparseVILACache`` rotates q and k and appends them in one ``rope_append_kv`` launch (``_attention_forward``).

An MLP whose intermediate size is not a multiple of ``PAD`` (Qwen2.5-VL's vision blocks: 3420) gets its gate and
up blocks padded to one with zero rows, and ``down_proj`` a zero-padded copy whose first columns are its weight
(``act(0) * 0 = 0``: outputs unchanged): cuBLAS runs such GEMMs with Hopper kernels only at 16-byte aligned sizes
(on the H200, the vision tower's 3420-wide MLP GEMMs ran as Ampere kernels at ~35 % of peak, 1.8 of the
encoder's 3.8 s at 128k visual tokens; bench/NOTES.md).
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import _backend
from .. import linear as gemv_linear
from .attention import ATTN_NAME
from .cache import SparseVILACache

QKV, GATE_UP, DOWN = "_sparsevila_qkv", "_sparsevila_gate_up", "_sparsevila_down"
PAD = 64  # MLP intermediate sizes are padded to a multiple of this


def _w4_linear_class():
    """``sparsevila_ops.quant.W4Linear`` when the [quant] extra is loaded (else no module can be one: the bf16 path
    never imports it)."""
    quant = sys.modules.get("sparsevila_ops.quant")
    return None if quant is None else quant.W4Linear


def _plain(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks) and "forward" not in m.__dict__ and not hasattr(m, "_hf_hook")


def _fusable(linears: Sequence[nn.Module]) -> bool:
    """Plain linears of one dtype, device and input size, all or none with bias, materialized, without hooks or
    an instance-level (wrapped) forward; or 4-bit ``W4Linear`` layers alike, of one group size."""
    if not all(_plain(m) for m in linears):
        return False
    if all(type(m) is nn.Linear and not m.weight.is_meta for m in linears):
        keys = {(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in linears}
    else:
        w4 = _w4_linear_class()
        if w4 is None or not all(type(m) is w4 for m in linears):
            return False
        keys = {(m.scales.dtype, m.qweight.device, m.in_features, m.group_size) for m in linears}
    return len(keys) == 1 and len({m.bias is None for m in linears}) == 1


def _same_storage(t: Optional[torch.Tensor], base: torch.Tensor) -> bool:
    return t is not None and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _current(linears: Sequence[nn.Module], fused: Optional[tuple]) -> bool:
    """Whether the linears' weights (and biases) are still the views of ``fused`` that ``_concat_into_views`` or
    ``_pad_columns`` made (4-bit: their packed weights the views, their scales and zeros unchanged since)."""
    if fused is None:
        return False
    weight, bias = fused[:2]
    if isinstance(weight, nn.Module):  # a fused W4Linear
        return all(_same_storage(m.qweight, weight.qweight) and (m.scales, m.scales._version, m.zeros,
                                                                 m.zeros._version) == src
                   for m, src in zip(linears, fused[3]))
    return all(_same_storage(m.weight, weight) and (bias is None or _same_storage(m.bias, bias)) for m in linears)


def _padded(n: int, pad: int) -> int:
    return -(-n // pad) * pad


def _concat_w4(linears: Sequence[nn.Module]) -> tuple:
    """``(fused W4Linear, None, split sizes, sources)`` of 4-bit layers concatenated along the output dim (no
    padding): each layer's packed weight becomes a view of its rows; scales and zeros (3 % of the bytes) are copied,
    so ``sources`` records them and their versions for ``_current``."""
    quant = sys.modules["sparsevila_ops.quant"]
    with torch.no_grad():
        qweight = torch.cat([m.qweight for m in linears], dim=0)
        w4 = quant.W4Weight(qweight, torch.cat([m.scales for m in linears], dim=1).contiguous(),
                            torch.cat([m.zeros for m in linears], dim=1).contiguous(), linears[0].group_size)
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    sizes = [m.out_features for m in linears]
    for m, view in zip(linears, qweight.split(sizes, dim=0)):
        m.qweight = view
    return quant.W4Linear(w4, bias), None, sizes, [(m.scales, m.scales._version, m.zeros, m.zeros._version)
                                                   for m in linears]


def _concat_into_views(linears: Sequence[nn.Module], pad: int = 1) -> tuple:
    """``(weight, bias or None, split sizes)`` of the linears concatenated along the output dim, each padded with
    zero rows to a multiple of ``pad``; each linear's weight (and bias) is replaced by a view of its block. 4-bit
    layers: ``_concat_w4`` (no padding)."""
    if not isinstance(linears[0], nn.Linear):
        return _concat_w4(linears)
    outs = [m.weight.shape[0] for m in linears]
    sizes = [_padded(n, pad) for n in outs]
    w0 = linears[0].weight
    with torch.no_grad():
        weight = w0.new_zeros(sum(sizes), w0.shape[1])
        bias = w0.new_zeros(sum(sizes)) if linears[0].bias is not None else None
    blocks = list(zip(linears, weight.split(sizes, dim=0),
                      bias.split(sizes, dim=0) if bias is not None else [None] * len(linears), outs))
    with torch.no_grad():
        for m, wv, bv, n in blocks:
            wv[:n].copy_(m.weight)
            if bv is not None:
                bv[:n].copy_(m.bias)
    for m, wv, bv, n in blocks:
        m.weight = nn.Parameter(wv[:n], requires_grad=m.weight.requires_grad)
        if bv is not None:
            m.bias = nn.Parameter(bv[:n], requires_grad=m.bias.requires_grad)
    return weight, bias, sizes


def _pad_columns(linear: nn.Linear, width: int) -> tuple:
    """``(weight, bias)``: ``linear``'s weight in the first columns of a zero ``[out, width]`` tensor; the linear's
    weight becomes that view (its bias is kept)."""
    w = linear.weight
    with torch.no_grad():
        padded = w.new_zeros(w.shape[0], width)
        padded[:, :w.shape[1]].copy_(w)
    linear.weight = nn.Parameter(padded[:, :w.shape[1]], requires_grad=w.requires_grad)
    return padded, linear.bias


def _own_storage(linears: Sequence[nn.Module]) -> None:
    """Give each linear's weight and bias (4-bit: packed weight) a storage of its own (no longer views of one fused
    tensor)."""
    with torch.no_grad():
        for m in linears:
            if not isinstance(m, nn.Linear):
                m.qweight = m.qweight.clone()
                continue
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)


GEMV_ROWS = 1  # rows (decode batch) up to which linears run sparsevila_ops.gemv: faster than cuBLAS at 1 on the
               # H200, 2.7-2.8x slower at 8 (bench/NOTES.md)
_CUDA_READY: dict = {}  # (op, device) -> whether the op's cuda backend runs there (asked once; ``fuse`` asks eagerly)


def _cuda_ready(op: str, device: torch.device) -> bool:
    """Whether the cuda backend of ``op`` (``gemv``, ``w4a16_linear``) runs on ``device``: usable there and its
    module built or loaded (the JIT build runs here, once per machine, so a failed build leaves the unfused path in
    place rather than a slower portable kernel). Asked once per op and device: a dict hit after that, also while
    ``torch.compile`` traces."""
    ready = _CUDA_READY.get((op, device))
    if ready is None:
        ready = _CUDA_READY[(op, device)] = _backend._loadable(op, "cuda", device)
    return ready


def _decode_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a linear layer of ``weight`` on ``x [..., K]`` runs :func:`sparsevila_ops.gemv`: up to ``GEMV_ROWS``
    rows (a decode step) of fp16/bf16 on a GPU where the cuda backend runs (its GEMV streams weights faster than
    cuBLAS at these sizes, bench/NOTES.md; the portable Triton one does not, so without the cuda backend
    ``F.linear`` runs), no autograd recording into a trainable weight or x, and (outside ``torch.compile``, whose
    graphs read only what ``fuse`` recorded) no other backend requested."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if x.numel() > GEMV_ROWS * x.shape[-1] or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if not torch.compiler.is_compiling() and _backend.requested_backend() not in (None, "cuda"):
        return False
    return _cuda_ready("gemv", x.device)


def _decode_w4_glu(x: torch.Tensor) -> bool:
    """Whether a 4-bit fused gate/up ``W4Linear`` on ``x [..., K]`` runs ``w4a16_linear(..., glu=True)``: rows its
    GEMV kernel serves (a decode step), on a GPU where that op's cuda backend runs (its epilogue is fused; the
    portable one would add a pass), and (outside ``torch.compile``) no other backend requested."""
    quant = sys.modules["sparsevila_ops.quant"]
    if x.device.type != "cuda" or x.numel() == 0 or x.numel() > quant.MAX_KERNEL_ROWS * x.shape[-1]:
        return False
    if not torch.compiler.is_compiling() and _backend.requested_backend() not in (None, "cuda"):
        return False
    return _cuda_ready("w4a16_linear", x.device)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one :func:`sparsevila_ops.gemv` launch where :func:`_decode_gemv` allows."""
    if not _decode_gemv(x, weight):
        return F.linear(x, weight, bias)
    return gemv_linear.gemv(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _call_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, through :func:`_linear` when it is a plain ``nn.Linear``."""
    if type(linear) is nn.Linear and _plain(linear):
        return _linear(x, linear.weight, linear.bias)
    return linear(x)


def _fused_output(module: nn.Module, x: torch.Tensor, state: str) -> torch.Tensor:
    """The fused projection's output ``x W^T (+ b)`` (the projections' outputs side by side, padded blocks
    included)."""
    weight, bias = module.__dict__[state][:2]
    return weight(x) if isinstance(weight, nn.Module) else _linear(x, weight, bias)


def _project(module: nn.Module, x: torch.Tensor, names: Sequence[str], state: str) -> List[torch.Tensor]:
    """The outputs of ``module``'s projections ``names`` on ``x``: one fused linear, or the projections
    themselves while autograd records into trainable weights (the fused weight is detached)."""
    first = getattr(module, names[0])
    if _trains(first):
        return [getattr(module, n)(x) for n in names]
    return list(_fused_output(module, x, state).split(module.__dict__[state][2], dim=-1))


def _trains(linear: nn.Module) -> bool:
    return torch.is_grad_enabled() and isinstance(linear, nn.Linear) and linear.weight.requires_grad


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                       past_key_values=None, position_embeddings=None, *, rope: Callable, eager: Callable,
                       standard_rope: bool, **kwargs):
    """The Llama-family attention forward with ``q, k, v = split(x W_qkv^T + b_qkv)``. A decode step into a
    ``SparseVILACache`` read by the SparseVILA attention function, with ``rope`` the standard rotary embedding
    (``standard_rope``: ``x cos + rotate_half(x) sin``, ``cos, sin [B, 1, D]``), rotates q and k and appends in one
    launch (``SparseVILACache.rope_append``; that attention function reads the cache, not the returned k, v)."""
    bsz, q_len, _ = hidden_states.shape
    q, k, v = _project(self, hidden_states, ("q_proj", "k_proj", "v_proj"), QKV)
    q, k, v = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    cache = past_key_values
    if (standard_rope and q_len == 1 and cos.dim() == 3 and isinstance(cache, SparseVILACache) and cache.decoding()
            and self.config._attn_implementation == ATTN_NAME):
        q = cache.rope_append(self.layer_idx, q[:, :, 0], k[:, :, 0], v[:, :, 0], cos[:, 0], sin[:, 0])[:, :, None]
    else:
        if standard_rope and cos.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16) and cos.dtype == q.dtype \
                and triton_elementwise(q, k):
            from ..triton_kernels.vision import rope_qk
            q, k = rope_qk(q, k, cos, sin)  # the same bits as ``rope``, one kernel per tensor
        else:
            q, k = rope(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             sliding_window=getattr(self, "sliding_window", None), position_ids=position_ids,
                             **kwargs)
    return _call_linear(self.o_proj, out.reshape(bsz, q_len, -1).contiguous()), weights


def _eager_inference(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """No autograd recording (the replacements have no backward), no ``torch.compile`` tracing (inductor fuses
    such steps itself), and the reference backend not requested (``use_backend``, ``SPARSEVILA_BACKEND``)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return not torch.compiler.is_compiling() and _backend.requested_backend() != "reference"


def triton_elementwise(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether element-wise steps run our Triton kernels (``triton_kernels/vision.py``) on ``x``: eager inference
    (:func:`_eager_inference`) on a device where Triton runs (the device default backend)."""
    return _eager_inference(x, params) and _backend.default_backend(x.device) == "triton"


class PendingNorm:
    """Where a block whose last residual add was fused with the norm after it (``add_rms_norm``,
    ``add_layer_norm``: the next block's first norm, or the tower's final one) leaves that norm's output. The norm's
    forward takes it (:meth:`take`) when its input is the add's output (the tensor the block returned and the tower
    handed on), else computes its own. One entry; every take clears it."""

    def __init__(self) -> None:
        self._entry = None

    def put(self, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self._entry = (norm, x, y)

    def take(self, norm: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        entry, self._entry = self._entry, None
        return entry[2] if entry is not None and entry[0] is norm and entry[1] is x else None

    def clear(self) -> None:
        self._entry = None


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's forward (``weight``, ``variance_epsilon``: Qwen2's, Qwen2.5-VL's, Llama's) as one Triton
    kernel where :func:`triton_elementwise` allows, else the module's own."""
    if triton_elementwise(hidden_states, self.weight):
        from ..triton_kernels.vision import rms_norm
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def rms_norms(model: nn.Module) -> List[nn.Module]:
    """A decoder's RMSNorms (each layer's two and the final one; those with ``weight`` and ``variance_epsilon``)."""
    norms = [getattr(layer, n, None) for layer in model.layers for n in ("input_layernorm", "post_attention_layernorm")]
    norms.append(getattr(model, "norm", None))
    return [n for n in norms if n is not None and hasattr(n, "weight") and hasattr(n, "variance_epsilon")]


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``down(act(x W_gate^T) * (x W_up^T))`` with one GEMV for ``[W_gate; W_up]`` (and, intermediate size padded,
    the padded ``down``); at decode sizes (:func:`_decode_gemv`, :func:`_decode_w4_glu`) a SiLU MLP's gate/up GEMV
    emits ``silu(gate) * up`` itself (``gemv`` or ``W4Linear.glu``); elsewhere a SiLU gate times up as one Triton
    kernel where :func:`triton_elementwise` allows."""
    silu = isinstance(self.act_fn, (nn.SiLU, SiLUActivation))
    fused = self.__dict__.get(GATE_UP)
    glu = silu and fused is not None and fused[2][0] == fused[2][1] and not _trains(self.gate_proj)
    if glu and isinstance(fused[0], torch.Tensor) and _decode_gemv(x, fused[0]):
        h = gemv_linear.gemv(x.reshape(-1, x.shape[-1]), fused[0], fused[1], glu=True).view(*x.shape[:-1],
                                                                                              fused[2][0])
    elif glu and not isinstance(fused[0], torch.Tensor) and _decode_w4_glu(x):
        h = fused[0].glu(x)
    else:
        gate, up = _project(self, x, ("gate_proj", "up_proj"), GATE_UP)
        if silu and triton_elementwise(gate):
            from ..triton_kernels.vision import silu_mul
            h = silu_mul(gate, up)
        else:
            h = self.act_fn(gate) * up
    down = self.__dict__.get(DOWN)
    if down is None or h.shape[-1] == self.down_proj.in_features:  # not padded, or the autograd path
        return _call_linear(self.down_proj, h)
    return _linear(h, *down)


def _groups(layer: nn.Module, rope: Callable, eager: Callable, standard_rope: bool):
    """(module, projection names, state attribute, forward) of a layer's fusable groups: the attention's q/k/v
    when it has ``self_attn.q_proj/k_proj/v_proj``, the MLP's gate/up when it has ``mlp.gate_proj/up_proj``."""
    groups = []
    attn = getattr(layer, "self_attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        attn_forward = lambda self, *a, **kw: _attention_forward(  # noqa: E731
            self, *a, rope=rope, eager=eager, standard_rope=standard_rope, **kw)
        groups.append((attn, ("q_proj", "k_proj", "v_proj"), QKV, attn_forward))
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        groups.append((mlp, ("gate_proj", "up_proj"), GATE_UP, _mlp_forward))
    return groups


def _fuse_mlp_down(mlp: nn.Module, width: int) -> bool:
    """Give ``mlp.down_proj`` a zero-padded copy of ``width`` input columns (kept in ``DOWN``), or drop it when no
    padding is needed; False when ``down_proj`` cannot be padded (not a plain linear...)."""
    down = mlp.down_proj
    if width == down.in_features:
        mlp.__dict__.pop(DOWN, None)
        return True
    if not isinstance(down, nn.Linear) or not _fusable([down]):
        return False
    if not _current([down], mlp.__dict__.get(DOWN)):
        mlp.__dict__[DOWN] = _pad_columns(down, width)
    return True


def fuse(layers: Iterable[nn.Module], rope: Optional[Callable] = None, eager: Optional[Callable] = None, *,
         standard_rope: bool = False) -> List[str]:
    """Fuse (or re-fuse, or unfuse, as the module docstring says) each layer's ``self_attn`` q/k/v and ``mlp``
    gate/up projections (``_groups``); ``rope(q, k, cos, sin)`` is the model's rotary embedding, ``eager`` its eager
    attention (for ``_attn_implementation == "eager"``), needed only by layers with a ``self_attn``;
    ``standard_rope``: ``rope`` is ``x cos + rotate_half(x) sin`` (Llama's ``apply_rotary_pos_emb``), so decode steps
    may fuse it with the cache append (``_attention_forward``). Returns the fused groups (``"3.self_attn"``, ...)."""
    done = []
    for i, layer in enumerate(layers):
        for module, names, state, forward in _groups(layer, rope, eager, standard_rope):
            linears = [getattr(module, n) for n in names]
            pad = PAD if state == GATE_UP and isinstance(linears[0], nn.Linear) else 1  # 4-bit: never padded
            if not _fusable(linears) or (state == GATE_UP and not _fuse_mlp_down(
                    module, _padded(linears[0].out_features, pad))):
                _drop(module, state)
                continue
            if not _current(linears, module.__dict__.get(state)):
                module.__dict__[state] = _concat_into_views(linears, pad)
                module.forward = types.MethodType(forward, module)
            weight = getattr(linears[0], "weight", None)  # W4Linear: none, its buffers
            device = weight.device if weight is not None else linears[0].qweight.device
            if device.type == "cuda":  # asked now, outside any torch.compile trace
                _cuda_ready("gemv" if weight is not None else "w4a16_linear", device)
            done.append(f"{i}.{'self_attn' if state == QKV else 'mlp'}")
    return done


def _drop(module: nn.Module, state: str) -> None:
    if module.__dict__.pop(state, None) is not None:
        module.__dict__.pop("forward", None)
    if state == GATE_UP:
        down = module.__dict__.pop(DOWN, None)
        if down is not None and isinstance(module.down_proj, nn.Linear) and _current([module.down_proj], down):
            _own_storage([module.down_proj])


def unfuse(layers: Iterable[nn.Module]) -> None:
    """Remove what ``fuse`` installed; projections that were views of a fused weight get their own storage."""
    for layer in layers:
        for module, names, state, _ in _groups(layer, None, None, False):
            fused = module.__dict__.get(state)
            linears = [getattr(module, n) for n in names]
            if fused is not None and _fusable(linears) and _current(linears, fused):
                _own_storage(linears)
            _drop(module, state)
