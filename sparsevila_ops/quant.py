"""4-bit weight-only linear layers (W4A16, group-wise asymmetric), the ``[quant]`` extra.

Nothing in the bf16 path imports this module. A ``W4Weight`` stores ``W [N, K]`` as

    W[n, k] = (q[n, k] - zeros[k // G, n]) * scales[k // G, n],   q in [0, 15], zeros integer in [0, 15]

with G (``group_size``) a multiple of 128 dividing K: ``qweight`` int32 ``[N, K/8]`` (in each block of 128 along
K, word i holds ``q[n, 128 b + 16 j + i]`` in bits ``[4j, 4j + 4)``), ``scales`` fp16/bf16 ``[K/G, N]``, ``zeros``
uint8 ``[K/G, N]``. ``w4a16_linear`` runs ``torch.ops.sparsevila_quant.w4a16_linear`` (a GEMV/GEMM with fp32
accumulation; ``glu=True``: a gated MLP's ``silu(gate) * up`` from the fused gate/up weight) for up to 16 rows of x,
and dequantize + ``F.linear`` for more rows (prefill). Backends follow
``sparsevila_ops._backend``: ``cuda`` (``csrc/gemv4.cu``, host side ``cuda_gemv4``) where that backend runs, for
the inputs it covers, else ``triton`` (``triton_kernels/gemv4.py``) on CUDA, and ``reference``
(dequantize to fp32, fp32 matmul) on the CPU unless ``use_backend("triton")`` under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from . import _checks as C
from ._library import define
from .reference import linear_epilogue

__all__ = ["W4Linear", "W4Weight", "dequantize_w4", "quantize_model_linears", "quantize_w4", "w4a16_linear"]

PACK_K = 128  # K elements per packing block (16 int32 words); group sizes are multiples of it
MAX_KERNEL_ROWS = 16  # rows of x served by the GEMV kernel (one tensor-core tile); more go to dequant + matmul
HALF_DTYPES = C.HALF_DTYPES


def _unpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, K/8]`` -> q int32 ``[N, K]`` in [0, 15]."""
    N, words = qweight.shape
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    q = (qweight.view(N, words // 16, 1, 16) >> shifts.view(1, 1, 8, 1)).bitwise_and_(0xF)  # [N, blocks, j, i]
    return q.view(N, words * 8)


def _dequantize(qweight, scales, zeros, dtype: torch.dtype) -> torch.Tensor:
    """``(q - z) * s`` as ``[N, K]`` in ``dtype`` (q - z is exact in any float dtype: one rounding, of the product)."""
    N, K = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    w = _unpack(qweight).view(N, groups, K // groups).to(dtype)  # the int32 nibbles are freed here
    w.sub_(zeros.t().to(dtype)[..., None]).mul_(scales.t().to(dtype)[..., None])  # in place: one [N, K] buffer
    return w.view(N, K)


def _reference_w4a16_linear(x, qweight, scales, zeros, bias, glu, out) -> None:
    """Reference backend of the op: dequantize to fp32 (exact: (q - z) * s needs 15 bits), fp32 matmul (glu: then
    ``reference.glu_rounded``)."""
    linear_epilogue(x.float() @ _dequantize(qweight, scales, zeros, torch.float32).t(), bias, glu, out)


# -- the op: schema, fake, dispatch (its own namespace: an extra, not part of torch.ops.sparsevila) -------------
_lib = torch.library.Library("sparsevila_quant", "DEF")
define("w4a16_linear",
       "(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, bool glu, Tensor(a!) out) -> ()",
       lib=_lib, reference=_reference_w4a16_linear, triton="sparsevila_ops.triton_kernels.gemv4:w4a16_linear",
       cuda="sparsevila_ops.cuda_gemv4:w4a16_linear")


def _preferred_backend(device: torch.device, x: torch.Tensor, qweight, scales, zeros, bias=None, glu=False, *rest):
    """``cuda`` on a GPU for inputs its kernel covers (``cuda_gemv4.unsupported``; measured faster than the Triton
    kernel at every Qwen2.5-7B shape, ``bench/gemv4.py``), else None (the device default). Where the cuda backend
    cannot run (``_cuda.unusable``), the registry falls back to the default. Importing ``cuda_gemv4`` builds
    nothing."""
    if device.type != "cuda":
        return None
    from .cuda_gemv4 import unsupported
    return "cuda" if unsupported(x, qweight, scales, zeros, glu) is None else None


_backend.prefer("w4a16_linear", _preferred_backend)


# -- the weight bundle --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class W4Weight:
    """A 4-bit weight ``[N, K]`` (layout in the module doc). Construction checks shapes, dtypes and layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def __post_init__(self):
        G = _check_group_size(self.group_size)
        C.check_tensor("qweight", self.qweight, ndim=2, dtypes=(torch.int32,))
        C.check_tensor("scales", self.scales, ndim=2, dtypes=HALF_DTYPES)
        C.check_tensor("zeros", self.zeros, ndim=2, dtypes=(torch.uint8,))
        C.check_same_device(qweight=self.qweight, scales=self.scales, zeros=self.zeros)
        N, K = self.qweight.shape[0], self.qweight.shape[1] * 8
        if K % G:
            raise ValueError(f"qweight must be int32 [N, K/8] with K a multiple of group_size ({G}); got K = {K}")
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != (K // G, N):
                raise ValueError(f"{name} must be [K/group_size, N] = [{K // G}, {N}]; got {tuple(t.shape)}")
        for name, t in (("qweight", self.qweight), ("scales", self.scales), ("zeros", self.zeros)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous; got strides {t.stride()}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def dtype(self) -> torch.dtype:
        """The activation / output dtype (that of ``scales``)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV reads for the weight: packed nibbles + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def _check_group_size(group_size) -> int:
    C.check_int("group_size", group_size, lo=PACK_K)
    if group_size % PACK_K:
        raise ValueError(f"group_size must be a multiple of {PACK_K} (the packing block); got {group_size}")
    return group_size


def quantize_w4(weight: torch.Tensor, group_size: int = 128) -> W4Weight:
    """Round-to-nearest asymmetric 4-bit quantization of ``weight [N, K]`` (fp16/bf16) per group of
    ``group_size`` along K (a multiple of 128 dividing K).

    Per group: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``s = (hi - lo) / 15`` rounded up to the weight's dtype,
    ``z = round(-lo / s)``, ``q = clamp(round(w / s) + z, 0, 15)``; so ``|w - (q - z) s| <= s / 2``.
    """
    G = _check_group_size(group_size)
    C.check_tensor("weight", weight, ndim=2, dtypes=HALF_DTYPES, last_contiguous=False)
    N, K = weight.shape
    if K % G:
        raise ValueError(f"weight's in_features (K = {K}) must be a multiple of group_size ({G})")
    w = weight.detach().float().reshape(N, K // G, G)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))
    sd = s.to(weight.dtype)
    sd = torch.where(sd.float() < s, (sd.view(torch.int16) + 1).view(weight.dtype), sd)  # next value up (s > 0)
    s32 = sd.float()
    z = torch.round(-lo / s32).clamp(0, 15)
    q = (torch.round(w / s32[..., None]) + z[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    words = q.view(N, K // PACK_K, 8, 16).to(torch.int64) << (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)
    packed = words.sum(2)  # [N, blocks, 16] in [0, 2^32)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32).reshape(N, K // 8)
    return W4Weight(packed.contiguous(), sd.t().contiguous(), z.to(torch.uint8).t().contiguous(), G)


def dequantize_w4(w4: W4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``W [N, K] = (q - z) * s``, computed in ``dtype`` (default: the scales' dtype; fp32 and fp64 are exact)."""
    if not isinstance(w4, W4Weight):
        raise TypeError(f"w4 must be a W4Weight; got {type(w4).__name__}")
    return _dequantize(w4.qweight, w4.scales, w4.zeros, dtype or w4.dtype)


def w4a16_linear(x: torch.Tensor, w4: W4Weight, bias: Optional[torch.Tensor] = None, *,
                 glu: bool = False) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T (+ bias)`` in x's dtype, fp32 accumulation; with ``glu`` (W ``[2N, K]``: a gated
    MLP's gate rows, then its up rows; ``bias [2N]``) ``silu(gate) * up`` of y's halves ``[..., N]``, each step
    rounded to x's dtype as ``F.silu(gate) * up`` of the unfused outputs.

    ``x`` fp16/bf16 (the dtype of ``w4.scales``), last dim K contiguous; ``bias`` ``[N]`` in x's dtype or None.
    Up to 16 rows (the decode batch) run ``torch.ops.sparsevila_quant.w4a16_linear`` (the CUDA or Triton GEMV on
    a GPU, dequantize + fp32 matmul on ``reference``); more rows dequantize W and call ``F.linear``.
    """
    if not isinstance(w4, W4Weight):
        raise TypeError(f"w4 must be a W4Weight; got {type(w4).__name__}")
    C.check_tensor("x", x, dtypes=HALF_DTYPES)
    if x.dim() < 1 or x.shape[-1] != w4.in_features:
        raise ValueError(f"x must be [..., K] with K = w4.in_features = {w4.in_features}; got {tuple(x.shape)}")
    if x.dtype != w4.dtype:
        raise TypeError(f"x must have the dtype of w4.scales ({w4.dtype}); got {x.dtype}")
    C.check_same_device(x=x, qweight=w4.qweight)
    _check_bias(bias, w4)
    if not isinstance(glu, bool):
        raise TypeError(f"glu must be a bool; got {type(glu).__name__}")
    if glu and w4.out_features % 2:
        raise ValueError(f"w4 must be [2N, K] (gate rows, then up rows) with glu; got {w4.out_features} rows")
    return _w4a16_apply(x, w4.qweight, w4.scales, w4.zeros, bias, glu)


def _check_bias(bias: Optional[torch.Tensor], w4: W4Weight) -> None:
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1, dtypes=(w4.dtype,))
        if bias.shape[0] != w4.out_features:
            raise ValueError(f"bias must be [N] = [{w4.out_features}]; got {tuple(bias.shape)}")
        C.check_same_device(qweight=w4.qweight, bias=bias)


def _w4a16_apply(x, qweight, scales, zeros, bias, glu: bool = False) -> torch.Tensor:
    """The body of ``w4a16_linear`` without checks: the caller has validated x, the weight, bias and glu."""
    K = qweight.shape[1] * 8
    N = qweight.shape[0] // 2 if glu else qweight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.shape[0] > MAX_KERNEL_ROWS:
        y = F.linear(x2, _dequantize(qweight, scales, zeros, x.dtype), bias)
        if glu:
            gate, up = y.split(N, dim=1)
            y = F.silu(gate) * up
        return y.view(*x.shape[:-1], N)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    torch.ops.sparsevila_quant.w4a16_linear(x2, qweight, scales, zeros, bias, glu, out)
    return out.view(*x.shape[:-1], N)


# -- modules ------------------------------------------------------------------------------------------------------
class W4Linear(nn.Module):
    """``nn.Linear`` with a ``W4Weight`` (buffers ``qweight``, ``scales``, ``zeros``); forward is ``w4a16_linear``."""

    def __init__(self, w4: W4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(w4, W4Weight):
            raise TypeError(f"w4 must be a W4Weight; got {type(w4).__name__}")
        _check_bias(bias, w4)  # the buffers are validated once here; forward checks only x
        self.in_features, self.out_features, self.group_size = w4.in_features, w4.out_features, w4.group_size
        self.register_buffer("qweight", w4.qweight)
        self.register_buffer("scales", w4.scales)
        self.register_buffer("zeros", w4.zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "W4Linear":
        bias = None if linear.bias is None else linear.bias.detach().to(linear.weight.dtype)
        return cls(quantize_w4(linear.weight, group_size), bias)

    @property
    def w4(self) -> W4Weight:
        return W4Weight(self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, False)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of this layer's output halves (a fused gate/up layer, ``[2N, K]``):
        ``w4a16_linear(x, self.w4, self.bias, glu=True)``."""
        return self._linear(x, True)

    def _linear(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        # Per call only what x can change (the buffers were validated in __init__): building a W4Weight and the
        # full checks of w4a16_linear cost ~35 µs of host time per layer. Anything unexpected takes the public
        # path, which validates everything and names the rule that x breaks.
        scales, qweight = self.scales, self.qweight
        if (x.dim() == 0 or x.shape[-1] != self.in_features or x.dtype != scales.dtype or x.dtype not in HALF_DTYPES
                or x.stride(-1) != 1 or x.device != qweight.device or (glu and self.out_features % 2)):
            return w4a16_linear(x, self.w4, self.bias, glu=glu)
        return _w4a16_apply(x, qweight, scales, self.zeros, self.bias, glu)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


def quantize_model_linears(model: nn.Module, group_size: int = 128, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a ``W4Linear`` (in place); returns ``model``.

    The root module itself is never replaced (``W4Linear.from_linear`` converts a single layer). A layer is
    kept when any component of its dotted name is in ``skip`` (``"lm_head"``, or ``"visual"`` for a
    whole subtree). Every other layer must be quantizable: fp16/bf16 weight with in_features a multiple of
    ``group_size`` (else ``ValueError`` naming the layer).
    """
    _check_group_size(group_size)
    if isinstance(skip, str):
        raise TypeError(f"skip must be a sequence of module names, not a str; got {skip!r}")
    todo = [(name, mod) for name, mod in model.named_modules()
            if name and isinstance(mod, nn.Linear) and not set(name.split(".")) & set(skip)]
    for name, mod in todo:
        if mod.weight.dtype not in HALF_DTYPES:
            raise TypeError(f"{name}: weight must be fp16/bf16 to quantize; got {mod.weight.dtype}")
        if mod.in_features % group_size:
            raise ValueError(f"{name}: in_features ({mod.in_features}) must be a multiple of group_size "
                             f"({group_size}); pass skip=(..., {name.split('.')[-1]!r}) to keep it")
    for name, mod in todo:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, W4Linear.from_linear(mod, group_size))
    return model
