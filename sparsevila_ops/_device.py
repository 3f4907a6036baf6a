"""Device facts shared by the Triton and the CUDA host code and the autotune seam: GPU name, compute capability,
SM count, the PDL switch."""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, Tuple

import torch


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


CPU = "cpu"  # the GPU name of CPU tensors (Triton's interpreter)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_REMEMBERED: Dict[Tuple[str, torch.device], object] = {}


def _per_device(fn: Callable[[torch.device], object]):
    """Remember ``fn(device)`` per ``torch.device``: kernel keys ask on every launch, and even ``device.type``
    costs ~0.2 µs (a new string per call). A CUDA device without an index (the current one, which may change) is
    asked every time."""
    @functools.wraps(fn)
    def remembered(device: torch.device):
        hit = _REMEMBERED.get((fn.__name__, device))
        if hit is None:
            hit = fn(device)
            if device.index is not None or device.type != "cuda":
                _REMEMBERED[(fn.__name__, device)] = hit
        return hit
    return remembered


@_per_device
def gpu_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` of ``device``; ``"cpu"`` for any other device."""
    return _gpu_name(_index(device)) if device.type == "cuda" else CPU


def capability(device: torch.device) -> Tuple[int, int]:
    """Compute capability of a CUDA ``device`` (read once per index)."""
    return _capability(_index(device))


@_per_device
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA ``device``; 4 elsewhere (Triton's interpreter: a few splits, so multi-split paths run)."""
    return _sm_count(_index(device)) if device.type == "cuda" else 4


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper+): kernels launch while their predecessor drains and wait in
    ``griddepcontrol.wait``. Off for CPU tensors (the interpreter), before sm_90, or with ``SPARSEVILA_PDL=0``."""
    if device.type != "cuda" or os.environ.get("SPARSEVILA_PDL", "1") == "0":
        return False
    return capability(device) >= (9, 0)
