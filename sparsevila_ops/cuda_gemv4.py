"""Host side of ``w4a16_linear`` (``sparsevila_quant``, the ``[quant]`` extra) on the cuda backend:
``csrc/gemv4.cu`` (tensor-core GEMV whose dequantization is the MMA's, weights and x streamed through a per-warp
cp.async ring, K split over a CTA's warps and summed in shared memory: one launch, deterministic), built and loaded
by ``_cuda``.

Covered: bf16/fp16, 1 <= M <= 16, N (outputs; glu: half of W's rows) a multiple of 8, x with unit column stride
and 16-byte aligned rows, weight tensors, out and bias contiguous (weights 16-byte aligned). Other calls run the
Triton backend's kernel (through the backend registry, so this module never imports Triton), which covers every
case of the op.

Config (``W4A16_CUDA``, the autotune seam; default ``_default``): ``tiles`` (1, 2, 4; glu 2 or 4, half of them
gate rows, half up rows) of 8 W rows per warp, ``warps`` per CTA (1-8), of which ``kwarps`` (dividing ``warps``)
split K and the rest own further rows, ``stages`` of each warp's ring (2, 4, 6, 8: stages - 1 blocks of 128 in
flight), ``aw`` (1: the weights as the MMA's A operand, two tiles per MMA and x as its 2-register B: R / 2 + 1
MMAs per slice instead of R + 1 and half the fold; M <= 8 and tiles 2 or 4; 375 instead of 457 SASS instructions
per block of 4 tiles, not yet timed, so the default stays 0 and the tuner decides).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _backend, _cuda, _device
from .autotune import Tunable, gpu_name

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
PACK_K = 128  # K elements per packing block (quant.PACK_K; not imported: quant imports this module's op)
MAX_ROWS = 16  # rows of x per launch (the MMA's m)
RING_BYTES_PER_TILE_STAGE = 512 + 16 + 8  # weights (32 lanes x 16 B), 8 scales, 8 zeros
RING_BYTES_PER_X_ROW_STAGE = 288  # csrc/gemv4.cu kXPitch
SMEM_LIMIT = 227 * 1024  # sm_90's opt-in maximum per CTA (the tuner prunes by the device's own)


def unsupported(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                glu: bool = False) -> Optional[str]:
    """Why the kernel cannot take these inputs (None: it can)."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (bf16/fp16 only)"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"{x.shape[0]} rows of x (1..{MAX_ROWS})"
    N = qweight.shape[0] // 2 if glu else qweight.shape[0]
    if N % 8:
        return f"N = {N} not a multiple of 8"
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) % 8) or x.data_ptr() % 16:
        return "x not 16-byte aligned rows with unit column stride"
    if any(t.data_ptr() % 16 or not t.is_contiguous() for t in (qweight, scales, zeros)):
        return "weight tensors not contiguous and 16-byte aligned"
    return None


class W4CudaKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    M: int  # rows of x (the decode batch)
    N: int  # outputs per row of x (glu: half of W's rows)
    K: int  # in_features
    group: int
    glu: bool
    sms: int


def _key(x, qweight, scales, zeros, bias, glu, out) -> tuple:
    M, K = x.shape
    device = x.device
    return (gpu_name(device), x.dtype, M, out.shape[1], K, K // max(1, scales.shape[0]), bool(glu),
            _device.sm_count(device))


def _default(key: W4CudaKey) -> dict:
    """Every warp splits K, a 2-stage ring; the most rows per warp (4, 2, 1 tiles of 8) that still gives >= 3.25
    warps per SM at 8 warps per CTA; 8 warps, or 4 where 4 already give >= 24 warps per SM (a 7B model's gate/up).
    glu counts W's rows and keeps at least 2 tiles (a gate and an up tile). The weights are the MMA's A operand
    (``aw``) wherever they can be (M <= 8, 2 or 4 tiles): on the H200 it beat ``aw`` 0 in 462 of 464 configs of
    Qwen2.5-7B's four shapes at M 1 and 8 (median 1.07-1.24x, the worst 0.995x). On the H200 over 32 W4A16 GEMVs
    of 7B and 1.5B decoders at batch 1-8 this was within 1.04x of the best config of the space (geomean; worst
    1.15x), where the rule before (4 warps up to 32 blocks of K, >= 6.5 warps per SM) was 1.16x (1.79x at the 1.5B
    model's small GEMVs; ``bench/NOTES.md``)."""
    tiles, least, rows = 4, 2 if key.glu else 1, 2 * key.N if key.glu else key.N
    while tiles > least and -(-rows // (8 * tiles)) * 8 < 3.25 * key.sms:
        tiles //= 2
    warps = 4 if -(-rows // (8 * tiles)) * 4 >= 24 * key.sms else 8
    return {"tiles": tiles, "warps": warps, "kwarps": warps, "stages": 2, "aw": int(tiles >= 2 and key.M <= 8)}


def _space(key: W4CudaKey) -> list:
    """tiles 1 (not with glu), 2, 4 x (warps, kwarps) in (2, 2), (4, 4), (8, 8), (4, 2), (8, 4), (8, 2) x stages 2,
    4, 8 x aw 0, 1 (aw 1 for M <= 8 and tiles 2 or 4), without those over the shared-memory limit."""
    out = [{"tiles": t, "warps": w, "kwarps": k, "stages": s, "aw": a} for t in ((2, 4) if key.glu else (1, 2, 4))
           for w, k in ((2, 2), (4, 4), (8, 8), (4, 2), (8, 4), (8, 2)) for s in (2, 4, 8)
           for a in ((0, 1) if t >= 2 and key.M <= 8 else (0,))]
    return [c for c in out if _resources(key, c)[0] <= SMEM_LIMIT]


def _resources(key: W4CudaKey, cfg: dict):
    """Shared memory: each warp's ring (or the partials it leaves there, if larger). Registers: ptxas reports
    52-148 for the compiled instantiations (``__launch_bounds__(256)``)."""
    t, w, s = cfg["tiles"], cfg["warps"], cfg["stages"]
    ring = -(-s * (t * RING_BYTES_PER_TILE_STAGE + key.M * RING_BYTES_PER_X_ROW_STAGE) // 16) * 16
    return w * max(ring, 16 * 8 * t * 4), 148


def _launch(x, qweight, scales, zeros, bias, glu, out, cfg) -> None:
    M, K = x.shape
    _cuda.library().w4a16_linear(
        _DTYPES[x.dtype], x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        0 if bias is None else bias.data_ptr(), out.data_ptr(), M, out.shape[1], K, K // scales.shape[0],
        x.stride(0) if M > 1 else K, int(glu), cfg["tiles"], cfg["warps"], cfg["kwarps"], cfg["stages"], cfg["aw"],
        int(_device.use_pdl(x.device)),
        torch.cuda.current_stream(x.device).cuda_stream)


def _unsupported(x, qweight, scales, zeros, bias, glu, out) -> Optional[str]:
    """Why the kernel cannot take this launch here: the backend unusable on the device, or the inputs."""
    why = _cuda.unusable(x.device)
    if why is not None:
        return f"the cuda backend cannot run here: {why}"
    return unsupported(x, qweight, scales, zeros, glu) or _outputs_unsupported(bias, out)


def _outputs_unsupported(bias: Optional[torch.Tensor], out: torch.Tensor) -> Optional[str]:
    """The kernel writes ``out`` as a contiguous [M, N] and reads ``bias`` as a contiguous [N]."""
    if not out.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return "out or bias not contiguous"
    return None


# what decides a config's meaning and speed besides the host code: the kernel sources, the op's binding and
# declaration (_cuda.interface), nvcc flags
_SOURCE = [*(_cuda.source_dir() / f for f in ("gemv4.cu", "cp_async.cuh", "glu.cuh", "mbarrier.cuh", "mma_sync.cuh",
                                                    "launch_util.cuh")),
           _cuda.interface("w4a16_linear"), _cuda.NVCC_FLAGS]
W4A16_CUDA = Tunable("w4a16_linear", "cuda", _SOURCE, key=_key, key_type=W4CudaKey, space=_space, default=_default,
                     launch=_launch, resources=_resources, buckets=("M", "N", "K"), unsupported=_unsupported)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: Optional[torch.Tensor], glu: bool, out: torch.Tensor) -> None:
    """``out = x @ W^T (+ bias)`` (glu: ``silu(gate) * up`` of it) in one launch of the CUDA kernel (module doc);
    inputs it does not cover run the Triton backend's."""
    if x.shape[0] == 0 or qweight.shape[0] == 0:
        return
    if unsupported(x, qweight, scales, zeros, glu) is not None or _outputs_unsupported(bias, out) is not None:
        _backend.implementation("w4a16_linear", "triton", x.device)(x, qweight, scales, zeros, bias, glu, out)
        return
    W4A16_CUDA(x, qweight, scales, zeros, bias, glu, out)
