"""Device facts shared by the Triton and the CUDA host code and the autotune seam: GPU name, compute capability,
SM count, shared memory per block, the PDL switch, and the guard that launches kernels on their tensors' device."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, List, Optional, Tuple

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


class _PerDevice(dict):
    """``fn(device)`` remembered per ``torch.device``. Kernel keys ask on every launch, so the lookup is the dict's
    own ``__getitem__`` (no Python frame on a hit: ~0.05 µs, where even ``device.type`` costs ~0.2 µs, a new
    string per call). A CUDA device without an index (the current one, which may change) is asked every time."""

    def __init__(self, fn: Callable[[torch.device], object]):
        super().__init__()
        self.fn = fn

    def __missing__(self, device: torch.device):
        value = self.fn(device)
        if device.index is not None or device.type != "cuda":
            self[device] = value
        return value


_REMEMBERED: List[_PerDevice] = []


def _per_device(fn: Callable[[torch.device], object]) -> Callable[[torch.device], object]:
    remembered = _PerDevice(fn)
    _REMEMBERED.append(remembered)
    return remembered.__getitem__


def _forget() -> None:
    """Empty what the ``_per_device`` functions remembered (tests that fake a device)."""
    for remembered in _REMEMBERED:
        remembered.clear()


def _gpu_name_of(device: torch.device) -> str:
    return _gpu_name(_index(device)) if device.type == "cuda" else CPU


gpu_name = _per_device(_gpu_name_of)
"""``gpu_name(device)``: ``torch.cuda.get_device_name`` of ``device``; ``"cpu"`` for any other device."""


def capability(device: torch.device) -> Tuple[int, int]:
    """Compute capability of a CUDA ``device`` (read once per index)."""
    return _capability(_index(device))


def _sm_count_of(device: torch.device) -> int:
    return _sm_count(_index(device)) if device.type == "cuda" else 4


sm_count = _per_device(_sm_count_of)
"""``sm_count(device)``: SMs of a CUDA ``device``; 4 elsewhere (Triton's interpreter: a few splits, so multi-split
paths run)."""


@functools.lru_cache(maxsize=None)
def _smem_per_block(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_multiprocessor - 1024)


def smem_per_block(device: torch.device) -> int:
    """Opt-in shared memory per block (bytes) of a CUDA ``device`` (read once per index)."""
    return _smem_per_block(_index(device))


def _index_of_gpu(gpu: str) -> Optional[int]:
    """The first CUDA device named ``gpu`` (a kernel key's ``gpu`` field: the defaults see only the key); None for
    ``"cpu"`` and for a name no device has."""
    if gpu == CPU or not torch.cuda.is_available():
        return None
    return next((i for i in range(torch.cuda.device_count()) if _gpu_name(i) == gpu), None)


@functools.lru_cache(maxsize=None)
def smem_per_block_of_gpu(gpu: str) -> Optional[int]:
    """:func:`smem_per_block` of the CUDA devices named ``gpu``; None for ``"cpu"`` (the interpreter has no limit)
    and for a name no device has."""
    index = _index_of_gpu(gpu)
    return None if index is None else _smem_per_block(index)


@functools.lru_cache(maxsize=None)
def sm_count_of_gpu(gpu: str) -> Optional[int]:
    """SMs of the CUDA devices named ``gpu``; None for ``"cpu"`` and for a name no device has."""
    index = _index_of_gpu(gpu)
    return None if index is None else _sm_count(index)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper+): kernels launch while their predecessor drains and wait in
    ``griddepcontrol.wait``. Off for CPU tensors (the interpreter), before sm_90, or with ``SPARSEVILA_PDL=0``."""
    if device.type != "cuda" or os.environ.get("SPARSEVILA_PDL", "1") == "0":
        return False
    return capability(device) >= (9, 0)


def device_guard(device: torch.device):
    """A context in which ``device`` is the current CUDA device. Triton and the CUDA launchers launch on the
    current device, which need not be the tensors' (a model split over GPUs by ``device_map``, tensors on
    ``cuda:1`` while ``cuda:0`` is current); a no-op when it already is, and for other devices."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def on_tensor_device(fn: Callable) -> Callable:
    """``fn(x, ...)`` run under :func:`device_guard` of its first argument's device (kernel launchers called
    directly, outside the ops' dispatch, which guards the same way)."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        with device_guard(x.device):
            return fn(x, *args, **kwargs)
    return run
