"""The kernel-config seam: every kernel declares one :class:`Tunable` next to itself.

A Tunable names a kernel (``op``, ``backend``, and ``source``: what beyond its package's Python decides what a
config means and how fast it runs: files (paths, e.g. ``.cu`` sources) and values (e.g. compiler flags); Triton
kernels need none) and gives the functions the library and the tuner need:

- ``key(*args)`` and ``key_type``: the problem's fields as a plain tuple, in the order of the NamedTuple class
  ``key_type``: first ``gpu`` (:func:`gpu_name`), then dtype, head dim, GQA group and sizes, all exact. Every
  launch builds it, so it stays a plain tuple (a NamedTuple's constructor is a Python call, ~0.2 µs); the
  NamedTuple, ``key_type._make(fields)``, is built only where fields are read by name (:meth:`Tunable.key`,
  a table miss);
- ``space(key)``: the configs worth timing (dicts of launch parameters: tiles, warps, stages, splits...);
- ``default(key)``: the hand-written heuristic; it runs everywhere and sees the exact sizes;
- ``launch(*args, config)``: runs the kernel with ``config`` (``args`` are those of the op's launcher);
- ``resources(key, config)`` (optional): estimated (shared memory bytes, registers per thread), so the tuner
  can skip configs that cannot fit;
- ``unsupported(*args)`` (optional): why the kernel cannot run these arguments here (None: it can), so the
  tuner, the CLI and the benchmarks skip them with the reason; without it every call is taken;
- ``warmup(*args, config)`` (optional; Triton kernels, made by :meth:`Tunable.triton_warmup` from ``launch``):
  compiles what ``launch(*args, config)`` would run without launching it, so :meth:`Tunable.precompile` can compile
  the tuner's candidates on several threads before they are timed.

Tables store configs under :meth:`Tunable.table_key`: the key without ``gpu`` (tables are per GPU), with the
fields named in ``buckets`` rounded down to a power of two, so one tuned entry covers the sizes
``[2^k, 2^(k+1))``. Calling a Tunable (``DECODE(*args)``) looks its config up (user cache, then the shipped
table, then ``default``) and launches. The first lookup of a key reads the tables (once per process and GPU);
after that a launch costs building the key's plain tuple (``gpu`` from a dict: :func:`gpu_name`) and one dict
hit on it (a NamedTuple hashes and compares as its tuple, so both find the same entry).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from sparsevila_ops._device import CPU, gpu_name  # noqa: F401  (re-exported: the gpu field of every key)

_ALL: "weakref.WeakSet[Tunable]" = weakref.WeakSet()
_WARMUP_LOCK = threading.Lock()
def _plain(v) -> bool:
    """Numbers, strings, dtypes and containers of them: module constants whose ``repr`` is their meaning."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.dtype)):
        return True
    if isinstance(v, (tuple, list, frozenset)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_plain(k) and _plain(x) for k, x in v.items())
    return False


def reached(fn: Callable) -> Tuple[List[Callable], Dict[str, str]]:
    """What ``fn`` depends on inside its package (``sparsevila_ops``): the functions and Triton kernels it
    references by name, transitively (a Triton kernel counts as the Python function it wraps, compiled or
    interpreted; decorated functions as the one they wrap), sorted by qualified name, and the plain module
    constants they read (:func:`_plain`, ``tl.constexpr`` unwrapped) as ``{"module.name": repr}``."""
    def names(code):
        yield from code.co_names
        for const in code.co_consts:
            if hasattr(const, "co_names"):  # nested functions, lambdas, comprehensions
                yield from names(const)

    def unwrap(obj):
        obj = getattr(obj, "fn", obj)
        return getattr(obj, "__wrapped__", obj)

    root = unwrap(fn)
    package = root.__module__.split(".")[0]
    found, consts, todo = {f"{root.__module__}.{root.__qualname__}": root}, {}, [root]
    while todo:
        f = todo.pop()
        for name in names(f.__code__):
            if name not in f.__globals__:
                continue
            value = f.__globals__[name]
            value = getattr(value, "value", value) if type(value).__name__ == "constexpr" else value
            obj = unwrap(value)
            if inspect.isfunction(obj) and obj.__module__.split(".")[0] == package:
                qual = f"{obj.__module__}.{obj.__qualname__}"
                if qual not in found:
                    found[qual] = obj
                    todo.append(obj)
            elif _plain(value):
                consts[f"{f.__module__}.{name}"] = repr(value)
    return [found[k] for k in sorted(found)], dict(sorted(consts.items()))


def bucket(n: int) -> int:
    """The power of two at or below ``n`` (0 for 0): tables key sizes by it, so ``ctx + slack`` shares the entry
    of ``ctx``."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _text(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


class Tunable:
    """One kernel's seam (module docstring). ``op`` and ``backend`` name it in tables and on the CLI."""

    def __init__(self, op: str, backend: str, source: Sequence[object] = (), *, key: Callable[..., tuple],
                 key_type: type, space: Callable[[NamedTuple], list], default: Callable[[NamedTuple], dict],
                 launch: Callable[..., None], buckets: Sequence[str] = (),
                 resources: Optional[Callable[[NamedTuple, dict], Tuple[int, int]]] = None,
                 unsupported: Optional[Callable[..., Optional[str]]] = None,
                 warmup: Optional[Callable[..., None]] = None):
        self.op, self.backend, self.source = op, backend, tuple(source)
        self.key_fields, self.key_type = key, key_type
        self.space, self.default, self.launch, self.warmup = space, default, launch, warmup
        self.buckets, self.resources = frozenset(buckets), resources
        self._unsupported = unsupported
        self._memo: Dict[tuple, dict] = {}  # exact key (its fields) -> config, filled by the lookup chain
        self._source_hash: Optional[str] = None
        self._declared_launch = launch  # what the hash covers, even if a test or benchmark wraps ``launch``
        _ALL.add(self)

    def __repr__(self) -> str:
        return f"Tunable({self.op!r}, {self.backend!r})"

    @property
    def name(self) -> str:
        return f"{self.op}/{self.backend}"

    @property
    def source_hash(self) -> str:
        """sha256 (16 hex digits) of what decides a config's meaning and speed: the declared ``launch``, every
        function and Triton kernel of the package it reaches and the module constants they read (:func:`reached`),
        then the ``source`` files' bytes and values' ``repr``. Tuned entries of another version of those are not
        used; edits elsewhere (keys, docs, other kernels) keep them."""
        if self._source_hash is None:
            h = hashlib.sha256()
            functions, constants = reached(self._declared_launch)
            for fn in functions:
                h.update(inspect.getsource(fn).encode())
            h.update(repr(constants).encode())
            for item in self.source:
                h.update(Path(item).read_bytes() if isinstance(item, (str, Path)) else repr(item).encode())
            self._source_hash = h.hexdigest()[:16]
        return self._source_hash

    def table_key(self, key: NamedTuple) -> str:
        """``field=value,...`` without ``gpu``, the ``buckets`` fields rounded down to a power of two."""
        return ",".join(f"{f}={_text(bucket(v) if f in self.buckets else v)}"
                        for f, v in zip(key._fields[1:], key[1:]))

    def key(self, *args) -> NamedTuple:
        """The key of a launch with ``args`` (a ``key_type``)."""
        return self.key_type._make(self.key_fields(*args))

    def unsupported(self, *args) -> Optional[str]:
        """Why the kernel cannot run a launch with ``args`` here (None: it can; always None without the hook)."""
        return None if self._unsupported is None else self._unsupported(*args)

    def precompile(self, args: tuple, configs: Sequence[dict], jobs: int) -> None:
        """Compile the kernels of ``configs`` for ``args`` on ``jobs`` threads, so that their first launches find
        them in Triton's in-process cache instead of compiling one after the other. Each config's ``warmup`` runs
        under Triton's async compile mode, which hands the compiles to the threads (Triton's compiler releases the
        GIL) and, when all are done, caches the kernels. A config whose warmup or compile fails is passed over: its
        launch fails the same way and reports it. Does nothing with ``jobs`` <= 1, without the hook, or where
        :func:`_async_compiles` says no (CPU tensors: the interpreter compiles nothing)."""
        if jobs <= 1 or self.warmup is None or not _async_compiles(args):
            return
        from triton.runtime._async_compile import AsyncCompileMode
        with ThreadPoolExecutor(jobs) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for cfg in configs:
                with contextlib.suppress(Exception):
                    self.warmup(*args, cfg)

    @staticmethod
    def triton_warmup(launch: Callable[..., None]) -> Callable[..., None]:
        """The ``warmup`` hook of ``launch``, a launcher of Triton kernels: it runs ``launch`` with each
        ``kernel[grid](...)`` of this thread made a Triton warmup (binds the arguments and compiles, or finds the
        kernel compiled, launching nothing), so launch and warmup map a config to kernel arguments in one place.
        The launcher's other work (allocating scratch) still happens. Other threads launch as usual meanwhile; one
        thread warms up at a time."""
        def warmup(*args) -> None:
            from triton.runtime.jit import KernelInterface
            with _WARMUP_LOCK:
                getitem, me = KernelInterface.__getitem__, threading.get_ident()
                KernelInterface.__getitem__ = lambda kernel, grid: (
                    functools.partial(kernel.run, grid=grid, warmup=True) if threading.get_ident() == me
                    else getitem(kernel, grid))
                try:
                    launch(*args)
                finally:
                    KernelInterface.__getitem__ = getitem
        return warmup

    def config(self, args: tuple) -> dict:
        """The config a launch with ``args`` uses (user cache > shipped table > default)."""
        fields = self.key_fields(*args)
        cfg = self._memo.get(fields)
        if cfg is None:
            from .tables import resolve
            cfg = resolve(self, self.key_type._make(fields), args)
        return cfg

    def __call__(self, *args) -> None:
        """Launch with the config of :meth:`config`."""
        self.launch(*args, self.config(args))


def _async_compiles(args: tuple) -> bool:
    """Whether launches with ``args`` compile Triton kernels that :meth:`Tunable.precompile` can compile ahead:
    CUDA tensors, not Triton's interpreter, a Triton with the async compile mode (3.4 has none) and none of the
    caller's active."""
    if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        return False
    try:
        from triton import knobs
        from triton.runtime import _async_compile
    except ImportError:
        return False
    return not knobs.runtime.interpret and _async_compile.active_mode.get() is None


def forget_lookups() -> None:
    """Drop every Tunable's memo of looked-up configs (after the tables changed)."""
    for t in list(_ALL):
        t._memo.clear()
