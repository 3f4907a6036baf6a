"""Tuned-config tables (the user cache and the shipped per-GPU tables) and the lookup chain.

A *table* holds the tuned configs of one GPU (JSON, ``FORMAT`` 1)::

    {"format": 1,
     "meta": {"sparsevila_ops": "0.1.0", "torch": "2.13.0+cu128", "triton": "3.7.1", "gpu": "NVIDIA H200"},
     "kernels": {"decode_attention/triton": {
         "source": "<sha256/16 of the kernel's source files>",
         "entries": {"dtype=bfloat16,D=128,G=7,B=1,Hk=4,cap=8192,sms=132":
                     {"config": {...}, "us": 10.2, "default_us": 11.1}}}}}

The user cache is ``$SPARSEVILA_AUTOTUNE_CACHE``, else ``autotune.json`` in ``$SPARSEVILA_CACHE_DIR`` (default
``~/.cache/sparsevila_ops``): ``{"format": 1, "tables": {"<gpu name>": <table>}}``, written by ``tune``.
Shipped tables are ``autotune/configs/<gpu slug>.json`` (package data), one table each, written by ``export``.

The user cache is used only if its meta equals this process's (package, torch and triton versions, GPU name); a
shipped table only if its GPU name and Triton version do (what decides the code a config compiles to: shipped
tables are tuned with the torch of the GPU machine, not the user's); a kernel's entries only if their source hash
equals the kernel's. Anything else is ignored with one log line.

Lookup (:func:`resolve`): user cache, then shipped table, then the kernel's default; the files are read once per
process. With ``SPARSEVILA_AUTOTUNE=1`` a key found in neither table is tuned and stored in the user cache,
except while a CUDA graph is being captured or torch.compile traces: then the chain is used (logged once).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .tunable import Tunable, forget_lookups

FORMAT = 1
META_FIELDS = ("sparsevila_ops", "torch", "triton", "gpu")
SHIPPED_META_FIELDS = ("triton", "gpu")
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
USER, SHIPPED, DEFAULT = "user cache", "shipped table", "default"

log = logging.getLogger("sparsevila_ops.autotune")
_lock = threading.RLock()  # tuning and writes; lookups take no lock (they must stay traceable by torch.compile)
_user: Optional[dict] = None  # the parsed user cache, read once
_shipped: Dict[str, Optional[dict]] = {}  # gpu -> its shipped table (None: none, or not usable)
_entries: Dict[Tuple[str, str], Dict[str, Tuple[dict, str]]] = {}  # (gpu, kernel) -> table key -> (config, where)
_noted: set = set()


def cache_path() -> Path:
    """The user cache file: ``$SPARSEVILA_AUTOTUNE_CACHE``, else ``$SPARSEVILA_CACHE_DIR/autotune.json``."""
    path = os.environ.get("SPARSEVILA_AUTOTUNE_CACHE")
    if path:
        return Path(path)
    return Path(os.environ.get("SPARSEVILA_CACHE_DIR", Path.home() / ".cache" / "sparsevila_ops")) / "autotune.json"


def slug(gpu: str) -> str:
    """File name of a GPU's shipped table: its name, lower case, non-alphanumerics as ``_``."""
    return "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_")


def shipped_path(gpu: str) -> Path:
    return SHIPPED_DIR / f"{slug(gpu)}.json"


def current_meta(gpu: str) -> dict:
    """The stamp a table made here carries (and must carry to be used here)."""
    import sparsevila_ops
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"sparsevila_ops": sparsevila_ops.__version__, "torch": torch.__version__, "triton": triton_version,
            "gpu": gpu}


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        log.warning(message)


def _mismatch(table: dict, gpu: str, fields=META_FIELDS) -> Optional[str]:
    """Why ``table`` cannot be used for ``gpu`` here (None: it can), comparing the meta ``fields``."""
    if table.get("format") != FORMAT:
        return f"format {table.get('format')!r}, this reads {FORMAT}"
    meta, ours = table.get("meta", {}), current_meta(gpu)
    for field in fields:
        if meta.get(field) != ours[field]:
            return f"tuned with {field} {meta.get(field)!r}, this is {ours[field]!r}"
    return None


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _note_once(f"autotune: ignoring {path}: cannot read it ({e})")
        return None


def _user_table(gpu: str) -> Optional[dict]:
    global _user
    if _user is None:
        _user = _read(cache_path()) or {}
        if _user and _user.get("format") != FORMAT:
            _note_once(f"autotune: ignoring {cache_path()}: format {_user.get('format')!r}, this reads {FORMAT}")
            _user = {}
    table = _user.get("tables", {}).get(gpu)
    why = table and _mismatch(table, gpu)
    if why:
        _note_once(f"autotune: ignoring the {gpu} configs of {cache_path()}: {why}")
        return None
    return table


def _shipped_table(gpu: str) -> Optional[dict]:
    if gpu not in _shipped:
        path = shipped_path(gpu)
        table = _read(path)
        why = table and _mismatch(table, gpu, SHIPPED_META_FIELDS)
        if why:
            _note_once(f"autotune: ignoring {path}: {why}")
        _shipped[gpu] = None if why else table
    return _shipped[gpu]


def _kernel_entries(table: Optional[dict], tunable: Tunable, where: str) -> dict:
    section = (table or {}).get("kernels", {}).get(tunable.name)
    if not section:
        return {}
    if section.get("source") != tunable.source_hash:
        _note_once(f"autotune: ignoring the {tunable.name} configs of the {where}: the kernel source changed "
                   f"since they were tuned")
        return {}
    return section.get("entries", {})


def entries(tunable: Tunable, gpu: str) -> Dict[str, Tuple[dict, str]]:
    """``table key -> (config, where)`` of ``tunable`` on ``gpu``: the shipped table's, then the user cache's over
    them. Read once per process (per GPU and kernel)."""
    found = _entries.get((gpu, tunable.name))
    if found is None:
        found = {k: (e["config"], SHIPPED) for k, e in _kernel_entries(_shipped_table(gpu), tunable, SHIPPED).items()}
        found.update({k: (e["config"], USER) for k, e in _kernel_entries(_user_table(gpu), tunable, USER).items()})
        _entries[(gpu, tunable.name)] = found
    return found


def lookup(tunable: Tunable, key) -> Tuple[dict, str]:
    """(config, where it came from: ``USER``, ``SHIPPED`` or ``DEFAULT``) for ``key``."""
    hit = entries(tunable, key.gpu).get(tunable.table_key(key))
    return hit if hit is not None else (tunable.default(key), DEFAULT)


def user_has(tunable: Tunable, key) -> bool:
    """Whether the user cache already holds a usable entry for ``key`` (same GPU, versions and kernel source)."""
    return tunable.table_key(key) in _kernel_entries(_user_table(key.gpu), tunable, USER)


def tuning_blocked() -> Optional[str]:
    """Why a launch may not tune now (None: it may): torch.compile traces, or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return "torch.compile traces"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def resolve(tunable: Tunable, key, args: tuple) -> dict:
    """The lookup chain for a key not yet memoized (module docstring); memoizes its answer."""
    cfg, where = lookup(tunable, key)
    if where == DEFAULT and os.environ.get("SPARSEVILA_AUTOTUNE") == "1":
        why = tuning_blocked()
        if why is not None:  # not memoized: the key is tuned on its first launch outside capture / tracing
            _note_once(f"autotune: not tuning while {why}; using the tables and defaults")
            return cfg
        cfg = _tune_on_miss(tunable, key, args)
    tunable._memo[key] = cfg
    return cfg


def _tune_on_miss(tunable: Tunable, key, args: tuple) -> dict:
    from . import tuner
    with _lock:
        hit = entries(tunable, key.gpu).get(tunable.table_key(key))
        if hit is not None:  # another thread tuned it meanwhile
            return hit[0]
        try:
            result = tuner.tune(tunable, args, copy=True)
        except Exception as e:  # noqa: BLE001 - a launch must not fail because tuning did
            _note_once(f"autotune: tuning {tunable.name} at {tunable.table_key(key)} failed ({e}); using the "
                       f"default")
            return tunable.default(key)
        log.info("autotune: tuned %s at %s in %.1f s: %s", tunable.name, tunable.table_key(key), result.seconds,
                 result.config)
        return result.config


def _load_for_update() -> dict:
    data = _read(cache_path()) or {}
    return data if data.get("format") == FORMAT else {"format": FORMAT, "tables": {}}


def _write(data: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    _reload()


def store(tunable: Tunable, key, config: dict, us: float, default_us: Optional[float]) -> None:
    """Record ``config`` for ``key`` in the user cache (re-read first, so concurrent tuners keep each other's
    entries); a stale table of this GPU, or stale entries of this kernel, are replaced."""
    with _lock:
        data = _load_for_update()
        table = data["tables"].get(key.gpu)
        if table is None or _mismatch(table, key.gpu):
            table = data["tables"][key.gpu] = {"format": FORMAT, "meta": current_meta(key.gpu), "kernels": {}}
        section = table["kernels"].get(tunable.name)
        if section is None or section.get("source") != tunable.source_hash:
            section = table["kernels"][tunable.name] = {"source": tunable.source_hash, "entries": {}}
        section["entries"][tunable.table_key(key)] = {
            "config": config, "us": round(us, 3), "default_us": None if default_us is None else round(default_us, 3)}
        _write(data)


def clear(op: Optional[str] = None) -> int:
    """Remove the user cache's entries (all, or those of kernels of ``op``); returns how many were removed."""
    with _lock:
        data = _load_for_update()
        removed = 0
        for table in data["tables"].values():
            for name in [n for n in table.get("kernels", {}) if op is None or n.split("/")[0] == op]:
                removed += len(table["kernels"].pop(name).get("entries", {}))
        data["tables"] = {g: t for g, t in data["tables"].items() if t.get("kernels")}
        if data["tables"]:
            _write(data)
        else:
            cache_path().unlink(missing_ok=True)
            _reload()
        return removed


def user_tables() -> Dict[str, dict]:
    """Every table of the user cache, usable here or not (for ``show``)."""
    return (_read(cache_path()) or {}).get("tables", {})


def shipped_tables() -> Dict[str, dict]:
    """Every shipped table, by file name (for ``show``)."""
    return {p.name: _read(p) or {} for p in sorted(SHIPPED_DIR.glob("*.json"))}


def usable(table: dict, gpu: str) -> Optional[str]:
    """Why ``table`` is not used for ``gpu`` in this process (None: it is)."""
    return _mismatch(table, gpu)


def export(gpu: str, out: Optional[Path] = None) -> Path:
    """Write the user cache's table of ``gpu`` in the shipped format, to ``out`` (default: the shipped table of
    ``gpu`` in this package's ``configs/``). Raises ValueError when the cache has no usable table for it."""
    table = user_tables().get(gpu)
    if not table:
        raise ValueError(f"the user cache {cache_path()} has no configs for {gpu!r}")
    why = _mismatch(table, gpu)
    if why:
        raise ValueError(f"the {gpu} configs of {cache_path()} are stale ({why}); tune again before exporting")
    out = Path(out) if out is not None else shipped_path(gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return out


def _reload() -> None:
    """Forget what was read from the tables and every memoized lookup: the next lookup reads the files."""
    global _user
    _user = None
    _shipped.clear()
    _entries.clear()
    forget_lookups()


def reset() -> None:
    """``_reload`` and forget which messages were logged (a fresh process, for tests and tools)."""
    _reload()
    _noted.clear()
