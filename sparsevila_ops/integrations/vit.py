"""Model-agnostic forwards for the modules of ViT encoders (SigLIP-style towers), each a drop-in instance-level
``forward`` that falls back to the module's own where it does not apply:

- :func:`layer_norm_forward`: ``nn.LayerNorm`` as one Triton kernel (``triton_kernels.vision.layer_norm``);
- :func:`patch_embedding_forward`: a patch ``nn.Conv2d`` (kernel = stride) as one GEMM over the gathered patches;
- :func:`gelu_mlp_forward`: ``fc2(gelu_tanh(fc1(x)))`` with the GELU in fc1's cuBLASLt epilogue.

LLaVA-OneVision's ``enable`` attaches them to its SigLIP tower (``integrations/llava_onevision.py``); the timings
are ``bench/siglip_tower.py``'s.
"""
from __future__ import annotations

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


def layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm.forward`` as one Triton kernel (``triton_kernels.vision.layer_norm``) where
    ``fused.triton_elementwise`` allows and the affine parameters are 1-D in x's dtype; else the module's own."""
    w, b = self.weight, self.bias
    if (w is not None and b is not None and len(self.normalized_shape) == 1 and w.dtype == b.dtype == x.dtype
            and fused.triton_elementwise(x, w, b)):
        from ..triton_kernels.vision import layer_norm
        return layer_norm(x, w, b, self.eps)
    return type(self).forward(self, x)


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
