"""Model-agnostic forwards for the modules of ViT encoders (SigLIP-style towers), each a drop-in instance-level
``forward`` that falls back to the module's own where it does not apply:

- :func:`layer_norm_forward`: ``nn.LayerNorm`` as one Triton kernel (``triton_kernels.vision.layer_norm``);
- :func:`encoder_layer_forward`: a pre-norm layer with each residual add in the LayerNorm after it
  (``add_layer_norm``);
- :func:`patch_embedding_forward`: a patch ``nn.Conv2d`` (kernel = stride) as one GEMM over the gathered patches;
- :func:`gelu_mlp_forward`: ``fc2(gelu_tanh(fc1(x)))`` with the GELU in fc1's cuBLASLt epilogue.

LLaVA-OneVision's ``enable`` attaches them to its SigLIP tower (``integrations/llava_onevision.py``); the timings
are ``bench/siglip_tower.py``'s.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh

from . import fused


def half_gemm(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a vision step runs as a reshaped cuBLAS GEMM (:func:`patch_embedding_forward`,
    :func:`gelu_mlp_forward`): eager inference (``fused._eager_inference``) on CUDA tensors, all bf16 or all fp16."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and all(p.dtype == x.dtype for p in params)
            and fused._eager_inference(x, params))


def _triton_layer_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm`` runs as our Triton kernel on ``x``: an ``nn.LayerNorm`` over the last dim with affine
    parameters in x's dtype on x's device, where ``fused.triton_elementwise`` allows."""
    if not isinstance(norm, nn.LayerNorm):
        return False
    w, b = norm.weight, norm.bias
    return (w is not None and b is not None and len(norm.normalized_shape) == 1 and w.dtype == b.dtype == x.dtype
            and w.device == x.device and fused.triton_elementwise(x, w, b))


def layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor, pending: Optional[fused.PendingNorm] = None
                       ) -> torch.Tensor:
    """``nn.LayerNorm.forward``: the output the fused add before it left in ``pending`` when that add produced
    ``x`` (:func:`encoder_layer_forward`), else one Triton kernel (``triton_kernels.vision.layer_norm``) where
    :func:`_triton_layer_norm` allows, else the module's own."""
    y = None if pending is None else pending.take(self, x)
    if y is not None:
        return y
    if _triton_layer_norm(self, x):
        from ..triton_kernels.vision import layer_norm
        return layer_norm(x, self.weight, self.bias, self.eps)
    return type(self).forward(self, x)


def encoder_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          *, next_norm: Optional[nn.Module], pending: fused.PendingNorm, **kwargs) -> torch.Tensor:
    """A pre-norm ViT layer's forward (SigLIP's ``SiglipEncoderLayer``: ``h += attn(ln1(h)); h += mlp(ln2(h))``)
    with each residual add fused into the LayerNorm after it (``add_layer_norm``): the attention's into
    ``layer_norm2``, the MLP's into ``next_norm`` (the next layer's ``layer_norm1``, or the tower's post-LayerNorm),
    whose forward then takes its output from ``pending``. Each add and norm: 4 passes over the residual stream
    instead of 5. The layer's own forward where the norms do not run as Triton kernels, or with no ``next_norm``."""
    if not (next_norm is not None and _triton_layer_norm(self.layer_norm2, hidden_states)
            and _triton_layer_norm(next_norm, hidden_states)):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
    h, x = _add_layer_norm(hidden_states, h, self.layer_norm2)
    out, x = _add_layer_norm(h, self.mlp(x), next_norm)
    pending.put(next_norm, out, x)
    return out


def _add_layer_norm(x: torch.Tensor, r: torch.Tensor, norm: nn.LayerNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + r, norm(x + r))``: one Triton kernel when x and r agree in shape and dtype, else eager's add."""
    if r.shape == x.shape and r.dtype == x.dtype:
        from ..triton_kernels.vision import add_layer_norm
        return add_layer_norm(x, r, norm.weight, norm.bias, norm.eps)
    s = x + r
    return s, layer_norm_forward(norm, s)


PATCH_WEIGHT = "_sparsevila_patch_weight"  # a patch convolution's weight as a [out, K padded] matrix, and its key


def _patch_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """``conv``'s weight flattened to ``[out, C kh kw]`` and zero-padded to a multiple of 8 columns (cached on the
    module until the weight changes)."""
    w = conv.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = conv.__dict__.get(PATCH_WEIGHT)
    if cached is None or cached[0] != key:
        k = w[0].numel()
        matrix = w.new_zeros(w.shape[0], fused._padded(k, 8))
        matrix[:, :k] = w.reshape(w.shape[0], k)
        conv.__dict__[PATCH_WEIGHT] = cached = (key, matrix)
    return cached[1]


def patch_embedding_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A patch embedding ``nn.Conv2d`` (kernel = stride, no padding, no dilation, one group) as one GEMM where
    :func:`half_gemm` allows: ``out[n, :, i, j] = W_flat patch(n, i, j) + b`` over the patches ``[N gh gw, C kh
    kw]``, gathered by one copy with K zero-padded to a multiple of 8 (cuBLAS runs Hopper kernels only on 16-byte
    aligned rows; SigLIP's K is 3 x 14 x 14 = 588). Pixels past the last whole patch are dropped, as the stride
    drops them. The result is an ``[N, out, gh, gw]`` view of a row-major ``[N, gh, gw, out]`` tensor, so the
    usual ``flatten(2).transpose(1, 2)`` gives contiguous tokens. Else the module's own forward."""
    kh, kw = self.kernel_size
    params = (self.weight,) if self.bias is None else (self.weight, self.bias)
    if not (x.dim() == 4 and tuple(self.stride) == (kh, kw) and self.padding in ("valid", (0, 0))
            and tuple(self.dilation) == (1, 1) and self.groups == 1 and half_gemm(x, *params)):
        return type(self).forward(self, x)
    n, c, h, w = x.shape
    gh, gw, k = h // kh, w // kw, c * kh * kw
    matrix = _patch_matrix(self)
    patches = x.new_empty(n * gh * gw, matrix.shape[1])
    patches[:, k:].zero_()
    seen = x[:, :, :gh * kh, :gw * kw].unflatten(3, (gw, kw)).unflatten(2, (gh, kh))  # [n, c, gh, kh, gw, kw]
    patches[:, :k].view(n, gh, gw, c, kh, kw).copy_(seen.permute(0, 2, 4, 1, 3, 5))
    return F.linear(patches, matrix, self.bias).view(n, gh, gw, -1).permute(0, 3, 1, 2)


def gelu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fc2(gelu_tanh(fc1(x)))`` (SigLIP's MLP) with the GELU in fc1's cuBLASLt epilogue where :func:`half_gemm`
    allows (``torch._addmm_activation``: on CUDA the tanh approximation, applied to the fp32 accumulator before the
    one rounding, where transformers rounds fc1's output first); else the module's own forward."""
    fc1 = self.fc1
    if not (isinstance(self.activation_fn, GELUTanh) and type(fc1) is nn.Linear and fused._plain(fc1)
            and fc1.bias is not None and half_gemm(x, fc1.weight, fc1.bias)):
        return type(self).forward(self, x)
    h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
    return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
