"""The compiled decode step replayed from CUDA graphs the integration captures itself (model-agnostic).

Why: the host's time per decode step. transformers calls the compiled step once per token; with inductor's
CUDA-graph trees each call evaluates dynamo's guards, then the tree's Python (input data-pointer checks, the copy
of fresh inputs into static buffers, bookkeeping) before the replay: ~1.8 ms of host time per step on the H200's
host for Qwen2.5-VL-7B, ~0.95 ms with ``StepGraphs`` (bench/NOTES.md). Where a step's GPU work is shorter than
that, the host sets the pace. ``StepGraphs`` keeps the step compiled by inductor without its CUDA graphs and
captures it once per input signature: a later call with that signature copies its tensors into the captured
inputs (one ``_foreach_copy_``) and replays, without dynamo or the tree.

Each call's work runs exactly once: the first call of a signature runs the compiled step (compiling it), the
second captures it and replays the capture, later calls replay. The signature is every keyword's shape, stride,
dtype and device for tensors, the value of plain scalars, the same of lists, tuples and dicts, and for any other
object (a cache) its identity and its ``graph_key()`` when it has one (the host state the step branches on and
the buffers it uses), else the data pointers of its attributes' tensors and tensor lists. A signature's graph
holds no reference to those objects (a replaced cache's gigabytes are freed) and is dropped when one of them is
collected (its identity may then be reused). Weights are checked once per ``generate`` (``begin``): replaced
parameters, buffers or fused weights drop every graph. A step whose
Python mutates host state (not tensors) would not do so on replay; the integration's cache keeps a decode step's
state in tensors (``tests/test_step_graph.py`` checks that a step leaves the cache's host state alone).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._device import device_guard

_SEEN = object()  # a signature's first call ran eagerly; its second captures


def _tensors_of(obj) -> Tuple[torch.Tensor, ...]:
    out = []
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return tuple(out)


def _part(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.device)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_part(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _part(x)) for k, x in sorted(v.items())))
    if hasattr(v, "graph_key"):
        return ("O", id(v), v.graph_key())
    return ("O", id(v), tuple(t.data_ptr() for t in _tensors_of(v)) if hasattr(v, "__dict__") else ())


def signature(kwargs: dict) -> tuple:
    """What a captured graph depends on, per keyword (module doc)."""
    return tuple((k, _part(v)) for k, v in sorted(kwargs.items()))


def _is_object(v) -> bool:
    """What ``_part`` keys by identity: neither a tensor, a plain scalar nor a container."""
    return not (v is None or isinstance(v, (bool, int, float, str, torch.Tensor, tuple, list, dict)))


def _objects(v) -> Iterator[object]:
    """The objects ``_part`` keys by identity, inside ``v``."""
    if isinstance(v, (tuple, list)):
        for x in v:
            yield from _objects(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _objects(x)
    elif _is_object(v):
        yield v


def weights_key(model: torch.nn.Module) -> tuple:
    """The data pointers of what a capture bakes in besides its inputs: ``model``'s parameters and buffers, and the
    tensors its modules hold in tuples or lists (the integration's fused weights; a plain tensor attribute such as
    Qwen2.5-VL's ``rope_deltas``, set anew by each prefill and read outside the step, is left out)."""
    held = [t for m in model.modules() for v in vars(m).values() if isinstance(v, (tuple, list))
            for t in v if isinstance(t, torch.Tensor)]
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers(), *held))


def capture_with(record: Callable, fn: Callable, kwargs: dict) -> Callable[[dict], object]:
    """Record ``fn`` on copies of ``kwargs``' tensors (nested in dicts / lists / tuples too: a mask mapping) with
    ``record(run) -> replay_recording`` and return ``replay(kwargs)``: copy the new tensors in, replay. What the
    replay keeps holds none of ``kwargs``' objects (a cache): the recorded output has them taken out (``run``
    returns it detached) and each replay puts the call's own back (the same objects: the signature keys them by
    identity)."""
    flat, spec = tree_flatten(kwargs)
    where = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    static = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
    inputs = [static[i] for i in where]
    held = {id(v): i for i, v in enumerate(flat) if _is_object(v)}  # object -> its leaf in kwargs

    def run():
        """The step's output as ``(output, None)``, or when it contains objects of ``kwargs``: its leaves with
        ``None`` in their places and ``(spec, [(output leaf, kwargs leaf)])``."""
        out = fn(**tree_unflatten(static, spec))
        leaves, out_spec = tree_flatten(out)
        slots = [(i, held[id(v)]) for i, v in enumerate(leaves) if id(v) in held and v is flat[held[id(v)]]]
        if not slots:
            return out, None
        for i, _ in slots:
            leaves[i] = None
        return leaves, (out_spec, slots)
    replay_recording = record(run)

    def replay(kw: dict):
        new = tree_flatten(kw)[0]
        if where:
            torch._foreach_copy_(inputs, [new[i] for i in where])
        out, detached = replay_recording()
        if detached is None:
            return out
        out_spec, slots = detached
        leaves = list(out)
        for i, j in slots:
            leaves[i] = new[j]
        return tree_unflatten(leaves, out_spec)
    return replay


def cuda_record(run: Callable, device: torch.device) -> Callable[[], object]:
    """One CUDA graph of ``run()`` on ``device`` (its own memory pool); returns what replays it and gives the
    captured output. Capture and replay run with ``device`` current: torch captures on, and replays into, the
    current device's stream, which need not be the model's."""
    graph = torch.cuda.CUDAGraph()
    with device_guard(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = run()

    def replay():
        with device_guard(device):
            graph.replay()
        return out
    return replay


def step_device(kwargs: dict) -> torch.device:
    """The one CUDA device of ``kwargs``' tensors (a CUDA graph runs on one device)."""
    devices = {v.device for v in tree_flatten(kwargs)[0] if isinstance(v, torch.Tensor) and v.device.type == "cuda"}
    if len(devices) != 1:
        raise ValueError("step_graph captures the decode step as one CUDA graph, on one device: the step's tensors "
                         f"must be on one CUDA device; got {sorted(map(str, devices)) or 'none on CUDA'}")
    return devices.pop()


def _cuda_capture(fn: Callable, kwargs: dict) -> Callable[[dict], object]:
    device = step_device(kwargs)
    return capture_with(lambda run: cuda_record(run, device), fn, kwargs)


class StepGraphs:
    """``fn`` (the compiled step) behind CUDA graphs captured per ``signature``; ``capture`` is swappable for
    tests (``capture(fn, kwargs) -> replay``)."""

    def __init__(self, fn: Callable, capture: Optional[Callable] = None):
        self.fn = fn
        self.capture = capture or _cuda_capture
        self.graphs: Dict[tuple, object] = {}
        self._pinned: list = []  # objects of signatures that cannot be weakly referenced
        self._weights: Optional[tuple] = None

    def begin(self, model: torch.nn.Module) -> None:
        """Before a ``generate``: drop every graph when ``model``'s weights moved since the last one."""
        key = weights_key(model)
        if key != self._weights:
            self.graphs.clear()
            self._pinned.clear()
            self._weights = key

    def __call__(self, *args, **kwargs):
        if args:  # transformers calls the step with keywords only; anything else runs as compiled
            return self.fn(*args, **kwargs)
        key = signature(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            self.graphs[key] = _SEEN
            for obj in _objects(list(kwargs.values())):  # the key names it by identity: it dies with it
                try:
                    weakref.finalize(obj, self.graphs.pop, key, None)
                except TypeError:  # no weak references: held, so that its identity is never reused
                    self._pinned.append(obj)
            return self.fn(**kwargs)
        if entry is _SEEN:
            entry = self.graphs[key] = self.capture(self.fn, kwargs)
        return entry(kwargs)


def install(model, graphs_of: Callable) -> None:
    """Make ``model.get_compiled_call`` (what ``generate`` calls for its decode step) return
    ``graphs_of(model, compiled, compile_config)``: a ``StepGraphs`` over transformers' compiled call, kept while
    that call is."""
    orig = type(model).get_compiled_call

    def get_compiled_call(compile_config):
        return graphs_of(model, orig(model, compile_config), compile_config)
    model.get_compiled_call = get_compiled_call


def uninstall(model) -> None:
    model.__dict__.pop("get_compiled_call", None)
