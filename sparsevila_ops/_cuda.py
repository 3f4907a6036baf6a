"""JIT build and loading of the CUDA C++ kernels in ``csrc/`` (the ``cuda`` backend).

The sources use only the CUDA runtime (no torch headers), so they build in seconds with ninja + nvcc into a
shared library that ``ctypes`` loads; it works with any torch build. The library is cached under
``$SPARSEVILA_CACHE_DIR`` (default ``~/.cache/sparsevila_ops``) in a folder keyed by the sources, the flags and
nvcc's version, so a change to any of them rebuilds. A failed build raises with nvcc's output on the first call
that needs the library.

The kernels target sm_90 (thread-block clusters, bulk async copies, programmatic dependent launch).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

SOURCES = ("decode_cluster.cu",)
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xcompiler", "-fPIC", "-shared",
              "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90")
LIB_NAME = "sparsevila_cuda.so"


def source_dir() -> Path:
    from . import csrc  # the top-level csrc/ (mapped like triton_kernels/)
    return Path(csrc.__file__).parent


def nvcc_path() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    return "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None


def _ninja_path() -> Optional[str]:
    try:
        import ninja  # the pip package ships the binary
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def build(verbose: bool = False) -> Path:
    """Build (or find in the cache) the shared library; returns its path. Raises RuntimeError with nvcc's
    output when the build fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("the cuda backend needs nvcc: set CUDA_HOME or put nvcc on PATH")
    ninja = _ninja_path()
    if ninja is None:
        raise RuntimeError("the cuda backend needs ninja: pip install ninja")
    src = source_dir()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(version.encode() + " ".join(NVCC_FLAGS).encode())
    for name in SOURCES:
        h.update((src / name).read_bytes())
    cache = Path(os.environ.get("SPARSEVILA_CACHE_DIR", Path.home() / ".cache" / "sparsevila_ops"))
    out = cache / f"cuda-{h.hexdigest()[:16]}"
    lib = out / LIB_NAME
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    flags = " ".join(NVCC_FLAGS)
    srcs = " ".join(str(src / name) for name in SOURCES)
    (out / "build.ninja").write_text(
        f"rule nvcc\n  command = {nvcc} {flags} $in -o $out\n  description = nvcc $out\n"
        f"build {LIB_NAME}: nvcc {srcs}\n")
    res = subprocess.run([ninja, "-C", str(out)], capture_output=not verbose, text=True)
    if res.returncode != 0 or not lib.is_file():
        raise RuntimeError(f"building the cuda backend failed (ninja in {out}):\n{res.stdout}\n{res.stderr}")
    return lib


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The loaded kernels, with argument types declared (built on first use)."""
    lib = ctypes.CDLL(str(build()))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.svo_decode_cluster.argtypes = [i, i, p, p, p, p, p, p, p, p, f, ctypes.POINTER(ctypes.c_int64), p,
                                       i, i, i, i, i, i, i, i, p]
    lib.svo_decode_cluster.restype = i
    lib.svo_decode_max_active_clusters.argtypes = [i, i, i, i, i]
    lib.svo_decode_max_active_clusters.restype = i
    lib.svo_error_string.argtypes = [i]
    lib.svo_error_string.restype = ctypes.c_char_p
    return lib


def check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: CUDA error {code} ({library().svo_error_string(code).decode()})")


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def usable(device: torch.device) -> bool:
    """True where the cuda backend's kernels can run: a CUDA device of compute capability >= 9.0."""
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)
