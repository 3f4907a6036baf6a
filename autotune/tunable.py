"""The kernel-config seam: every kernel declares one :class:`Tunable` next to itself.

A Tunable names a kernel (``op``, ``backend``, the ``source`` files whose hash stamps its tuned entries) and
gives the functions the library and the tuner need:

- ``key(*args)``: a NamedTuple describing the problem, first field ``gpu`` (:func:`gpu_name`), then dtype, head
  dim, GQA group and sizes, all exact;
- ``space(key)``: the configs worth timing (dicts of launch parameters: tiles, warps, stages, splits...);
- ``default(key)``: the hand-written heuristic; it runs everywhere and sees the exact sizes;
- ``launch(*args, config)``: runs the kernel with ``config`` (``args`` are those of the op's launcher);
- ``resources(key, config)`` (optional): estimated (shared memory bytes, registers per thread), so the tuner
  can skip configs that cannot fit;
- ``unsupported(*args)`` (optional): why the kernel cannot run these arguments here (None: it can), so the
  tuner, the CLI and the benchmarks skip them with the reason; without it every call is taken.

Tables store configs under :meth:`Tunable.table_key`: the key without ``gpu`` (tables are per GPU), with the
fields named in ``buckets`` rounded down to a power of two, so one tuned entry covers the sizes
``[2^k, 2^(k+1))``. Calling a Tunable (``DECODE(*args)``) looks its config up (user cache, then the shipped
table, then ``default``) and launches. The first lookup of a key reads the tables (once per process and GPU);
after that a launch costs one dict hit on the exact key.
"""
from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from sparsevila_ops._device import CPU, gpu_name  # noqa: F401  (re-exported: the gpu field of every key)

_ALL: "weakref.WeakSet[Tunable]" = weakref.WeakSet()


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

    def __init__(self, op: str, backend: str, source: Sequence[str], *, key: Callable[..., NamedTuple],
                 space: Callable[[NamedTuple], list], default: Callable[[NamedTuple], dict],
                 launch: Callable[..., None], buckets: Sequence[str] = (),
                 resources: Optional[Callable[[NamedTuple, dict], Tuple[int, int]]] = None,
                 unsupported: Optional[Callable[..., Optional[str]]] = None):
        self.op, self.backend, self.source = op, backend, tuple(str(s) for s in source)
        self.key, self.space, self.default, self.launch = key, space, default, launch
        self.buckets, self.resources = frozenset(buckets), resources
        self._unsupported = unsupported
        self._memo: Dict[tuple, dict] = {}  # exact key -> config, filled by the lookup chain
        self._source_hash: Optional[str] = None
        _ALL.add(self)

    def __repr__(self) -> str:
        return f"Tunable({self.op!r}, {self.backend!r})"

    @property
    def name(self) -> str:
        return f"{self.op}/{self.backend}"

    @property
    def source_hash(self) -> str:
        """sha256 (16 hex digits) of the source files: tuned entries of another version are not used."""
        if self._source_hash is None:
            h = hashlib.sha256()
            for path in self.source:
                h.update(Path(path).read_bytes())
            self._source_hash = h.hexdigest()[:16]
        return self._source_hash

    def table_key(self, key: NamedTuple) -> str:
        """``field=value,...`` without ``gpu``, the ``buckets`` fields rounded down to a power of two."""
        return ",".join(f"{f}={_text(bucket(v) if f in self.buckets else v)}"
                        for f, v in zip(key._fields[1:], key[1:]))

    def unsupported(self, *args) -> Optional[str]:
        """Why the kernel cannot run a launch with ``args`` here (None: it can; always None without the hook)."""
        return None if self._unsupported is None else self._unsupported(*args)

    def config(self, args: tuple) -> dict:
        """The config a launch with ``args`` uses (user cache > shipped table > default)."""
        key = self.key(*args)
        cfg = self._memo.get(key)
        if cfg is None:
            from .tables import resolve
            cfg = resolve(self, key, args)
        return cfg

    def __call__(self, *args) -> None:
        """Launch with the config of :meth:`config`."""
        self.launch(*args, self.config(args))


def forget_lookups() -> None:
    """Drop every Tunable's memo of looked-up configs (after the tables changed)."""
    for t in list(_ALL):
        t._memo.clear()
