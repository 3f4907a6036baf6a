"""JIT build and loading of the ``cuda`` backend: the kernels of ``csrc/`` (``*.cu``, CUDA runtime only, no torch
headers) and their one pybind11 binding (``csrc/bindings.cpp``: pointers as ints, no torch either) are compiled
by nvcc through a ninja file into the extension module ``_sparsevila_cuda``, cudart linked statically (the
module loads without a GPU and with any torch build).

Cache: ``$SPARSEVILA_CACHE_DIR`` (default ``~/.cache/sparsevila_ops``) holds one folder per key,
``cuda-<package>-torch<version>-cu<nvcc version>-sm_90a-<hash>``, the hash over every source file of ``csrc/``,
the flags, nvcc's version, the Python ABI and pybind11's version. A build runs in a temporary folder that is
renamed to the key's name once complete, so a folder under that name always holds a whole build and a killed
build leaves only a temporary folder (the next build removes it). Builders of a key serialize on an ``fcntl``
lock of ``<folder>.lock``, which the OS releases when its holder dies, and look again once they hold it: a
process that waited loads what the other one built. An INFO line of the ``sparsevila_ops`` logger names the
folder before compiling (about a minute); ``python -m sparsevila_ops warmup`` builds ahead of time. A WARNING
line quotes any "Potential Performance Loss" that ptxas reports (such as wgmmas it had to serialize): the build
is usable but slow, and the CPU tests fail on one.

Toolchain: nvcc (``$SPARSEVILA_NVCC``, else ``$CUDA_HOME/bin``, ``PATH``, ``/usr/local/cuda/bin``), ninja and
pybind11 (``pip install -e ".[cuda]"``). Without them ``import sparsevila_ops`` still works and :func:`unusable`
gives the reason the backend cannot run. Targets: sm_90a code plus compute_90 PTX, which later GPUs compile at
load (the kernels use thread-block clusters, bulk async copies and programmatic dependent launch); code that needs
sm_90a itself (wgmma, setmaxnreg) must sit under ``__CUDA_ARCH_FEAT_SM90_ALL``.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

from . import _device

MODULE = "_sparsevila_cuda"
ARCH = "sm_90a"
BINDING = "bindings.cpp"
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")  # every file of csrc/ with these goes into the key
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xcompiler", "-fPIC",
              "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_90,code=compute_90")
CXX_FLAGS = ("-O2", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden")
LINK_FLAGS = ("-shared", "--cudart", "static")
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

log = logging.getLogger("sparsevila_ops")
PERF_LOSS = "Potential Performance Loss"  # ptxas's words for code it could not schedule as written (logged)

_module = None  # the loaded extension
_failure: Optional[str] = None  # why the build or load failed in this process (not retried)


class Toolchain(NamedTuple):
    nvcc: str
    nvcc_version: str  # the output of `nvcc --version`
    release: str  # e.g. 13.0.88
    ninja: str
    pybind11_include: str
    pybind11_version: str


def source_dir() -> Path:
    from . import csrc  # the top-level csrc/ (mapped like triton_kernels/)
    return Path(csrc.__file__).parent


def interface(*names: str) -> Tuple[str, ...]:
    """The binding statements (``m.def("name", ...)`` of ``bindings.cpp``) and C declarations (``svo_<name>`` of
    ``sparsevila_cuda.h``) of the functions ``names``, as texts: what of those two shared files decides how a kernel
    is launched (a Tunable's ``source``: a value, hashed by its repr), so that adding or changing another op's
    binding leaves its tuned entries valid. ValueError naming a function that is not there."""
    binding = (source_dir() / BINDING).read_text()
    header = (source_dir() / "sparsevila_cuda.h").read_text()
    out = []
    for name in names:
        start = re.search(rf'm\.def\(\s*"{name}",', binding)
        decl = re.search(rf"^int svo_{name}\([^;]*;", header, re.M)
        if start is None or decl is None:
            raise ValueError(f"no binding or declaration of {name!r} in csrc/{BINDING} / sparsevila_cuda.h")
        out += [binding[start.start():_statement_end(binding, start.start())], decl.group(0)]
    return tuple(out)


def _statement_end(text: str, start: int) -> int:
    """The index after the ``;`` that closes the parenthesized call starting at ``text[start:]`` (string and char
    literals skipped)."""
    depth, i, quote = 0, start, None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == ";" and depth == 0:
            return i + 1
        i += 1
    raise ValueError(f"unterminated statement at {start} of csrc/{BINDING}")


def sources() -> list:
    """Every source file of ``csrc/`` (sorted): all of them go into the build key."""
    return sorted(p for p in source_dir().iterdir() if p.suffix in SOURCE_SUFFIXES)


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEVILA_CACHE_DIR") or Path.home() / ".cache" / "sparsevila_ops")


def _find_nvcc() -> Tuple[Optional[str], Optional[str]]:
    explicit = os.environ.get("SPARSEVILA_NVCC")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit, None
        return None, f"SPARSEVILA_NVCC={explicit} is not an executable file"
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc"), None
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
    return (found, None) if found else (None, "nvcc not found (set SPARSEVILA_NVCC or CUDA_HOME, or put nvcc on PATH)")


def _find_ninja() -> Optional[str]:
    try:
        import ninja  # the pip package ships the binary
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


@functools.lru_cache(maxsize=None)
def _toolchain(env: tuple) -> Tuple[Optional[Toolchain], Optional[str]]:
    """(the tools, None) or (None, what is missing); cached per value of the environment variables it reads."""
    nvcc, why = _find_nvcc()
    if nvcc is None:
        return None, why
    try:
        res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvcc ({nvcc}) does not run: {e}"
    release = re.search(r"release [\d.]+, V([\d.]+)", res.stdout)
    if res.returncode != 0 or release is None:
        return None, f"nvcc ({nvcc}) does not run: `nvcc --version` exited {res.returncode}: " \
                     f"{(res.stdout + res.stderr).strip()[-300:]!r}"
    ninja = _find_ninja()
    if ninja is None:
        return None, "ninja not found (pip install ninja)"
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 not found (pip install pybind11)"
    return Toolchain(nvcc, res.stdout, release.group(1), ninja, pybind11.get_include(), pybind11.__version__), None


def _env() -> tuple:
    return tuple(os.environ.get(v) for v in ("SPARSEVILA_NVCC", "CUDA_HOME", "CUDA_PATH", "PATH"))


def toolchain() -> Toolchain:
    """The build tools; RuntimeError saying what is missing."""
    tools, why = _toolchain(_env())
    if tools is None:
        raise RuntimeError(f"the cuda backend cannot be built: {why}")
    return tools


def build_dir(tools: Optional[Toolchain] = None) -> Path:
    """The cache folder of this package and torch version, nvcc, arch, sources and flags (module doc)."""
    from . import __version__
    tools = tools or toolchain()
    h = hashlib.sha256()
    for part in (__version__, torch.__version__, tools.nvcc_version, ARCH, NVCC_FLAGS, CXX_FLAGS, LINK_FLAGS,
                 EXT_SUFFIX, tools.pybind11_version):
        h.update(repr(part).encode() + b"\0")
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    name = f"cuda-{__version__}-torch{torch.__version__}-cu{tools.release}-{ARCH}-{h.hexdigest()[:16]}"
    return cache_root() / re.sub(r"[^\w.-]", "_", name)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive fcntl lock on ``path``, held for the block; the OS drops it if this process dies."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the cuda kernels (lock %s)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _compile(tools: Toolchain, out: Path) -> None:
    """Copy the sources into ``out`` and build the module there with ninja; RuntimeError with nvcc's output."""
    for path in sources():
        shutil.copy2(path, out / path.name)
    q = shlex.quote
    includes = " ".join(f"-I{q(p)}" for p in (".", tools.pybind11_include, sysconfig.get_paths()["include"]))
    units = [p.name for p in sources() if p.suffix == ".cu"] + [BINDING]
    objects = [Path(u).stem + ".o" for u in units]
    lines = [f"nvcc = {q(tools.nvcc)}",
             f"rule cu\n  command = $nvcc {' '.join(NVCC_FLAGS)} -I. -c $in -o $out\n  description = nvcc $in",
             f"rule cxx\n  command = $nvcc {' '.join(CXX_FLAGS)} {includes} -c $in -o $out\n"
             f"  description = nvcc (host) $in",
             f"rule link\n  command = $nvcc {' '.join(LINK_FLAGS)} $in -o $out\n  description = link $out"]
    lines += [f"build {o}: {'cu' if u.endswith('.cu') else 'cxx'} {u}" for u, o in zip(units, objects)]
    lines.append(f"build {MODULE}{EXT_SUFFIX}: link {' '.join(objects)}")
    (out / "build.ninja").write_text("\n".join(lines) + "\n")
    res = subprocess.run([tools.ninja, "-C", str(out)], capture_output=True, text=True)
    if res.returncode != 0 or not (out / f"{MODULE}{EXT_SUFFIX}").is_file():
        raise RuntimeError(f"building the cuda kernels failed (ninja in {out}):\n{res.stdout[-6000:]}\n"
                           f"{res.stderr[-2000:]}")
    losses = [line.strip() for line in res.stdout.splitlines() if PERF_LOSS in line]
    if losses:  # e.g. ptxas serializing a kernel's wgmmas (C7514, C7518): correct, but much slower
        log.warning("ptxas reports %d potential performance losses in the cuda kernels:\n%s", len(losses),
                    "\n".join(losses[:4]))


def build() -> Path:
    """The extension module's path, compiled first when the cache has no complete build of this key (module
    doc). RuntimeError with the reason when a tool is missing or the build fails."""
    tools = toolchain()
    final = build_dir(tools)
    lib = final / f"{MODULE}{EXT_SUFFIX}"
    if lib.is_file():
        return lib
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if lib.is_file():  # another process finished it while this one waited
            return lib
        for stale in final.parent.glob(f"{final.name}.tmp*"):  # left by killed or failed builds
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not made by a rename (those always hold the module): not a build
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp", dir=final.parent))
        log.info("building the cuda kernels into %s (first use, about a minute)", final)
        _compile(tools, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a prebuilt cache from other users
        os.rename(tmp, final)
    return lib


def load(path: Path):
    """Import the extension module built at ``path``."""
    spec = importlib.util.spec_from_file_location(f"{__package__}.{MODULE}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def library():
    """The kernels' module, built or loaded from the cache on first use. A failure is kept: later calls raise it
    again without rebuilding, and :func:`unusable` reports it."""
    global _module, _failure
    if _module is None:
        if _failure is not None:
            raise RuntimeError(_failure)
        toolchain()  # a missing tool is not kept as a build failure (the lookup is cached per PATH/CUDA_HOME)
        try:
            _module = load(build())
        except (RuntimeError, OSError, ImportError) as e:
            _failure = str(e)
            raise RuntimeError(_failure) from e
    return _module


def unusable(device: torch.device) -> Optional[str]:
    """Why the cuda backend cannot run on ``device`` (None: it can): it needs a GPU of compute capability >= 9.0,
    and its module, loaded or buildable here (the toolchain present, no failed build)."""
    why = []
    if device.type != "cuda":
        why.append("it needs a GPU of compute capability >= 9.0")
    elif _device.capability(device) < (9, 0):
        why.append("it needs a GPU of compute capability >= 9.0, this one is %d.%d" % _device.capability(device))
    if _module is None:
        why += [w for w in (_toolchain(_env())[1], _failure) if w is not None]
    return "; ".join(why) or None


def main(argv=None) -> int:
    """``python -m sparsevila_ops warmup``."""
    p = argparse.ArgumentParser(prog="python -m sparsevila_ops warmup",
                                description="Build the cuda backend's kernels into the cache now (no GPU needed), "
                                            "so the first cuda call does not compile.")
    p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        path = build()
        load(path)
    except (RuntimeError, OSError, ImportError) as e:
        print(f"warmup: {e}", file=sys.stderr)
        return 1
    print(f"cuda kernels ready ({time.perf_counter() - t0:.1f} s): {path}")
    return 0
