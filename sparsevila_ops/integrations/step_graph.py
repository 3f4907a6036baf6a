"""The compiled decode step replayed from CUDA graphs the integration captures itself (model-agnostic).

Why: a host-bound decode step. transformers calls the compiled step once per token; with inductor's CUDA-graph
trees each call evaluates dynamo's guards, then the tree's Python (input data-pointer checks, the copy of fresh
inputs into static buffers, bookkeeping) before the replay. On the H200 the 4-bit (0.75, 0.95) Qwen2.5-VL-7B step
is 1.75 ms of GPU work and 2.41 ms per token; the GPU idles at those two boundaries (``bench/decode_host.py``,
bench/NOTES.md). ``StepGraphs`` keeps the step compiled by inductor without its CUDA graphs and captures it once
per input signature: a later call with that signature copies its tensors into the captured inputs (one
``_foreach_copy_``) and replays, without dynamo or the tree.

Each call's work runs exactly once: the first call of a signature runs the compiled step (compiling it), the
second captures it and replays the capture, later calls replay. The signature is every keyword's shape, stride,
dtype and device for tensors, the value of plain scalars, the same of lists, tuples and dicts, and for any other
object (a cache) its identity and its ``graph_key()`` when it has one (the host state the step branches on and
the buffers it uses), else the data pointers of its attributes' tensors and tensor lists. Weights are checked
once per ``generate`` (``begin``): replaced parameters, buffers or fused weights drop every graph. A step whose
Python mutates host state (not tensors) would not do so on replay; the integration's cache keeps a decode step's
state in tensors (``tests/test_step_graph.py`` checks that a step leaves the cache's host state alone).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

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


def weights_key(model: torch.nn.Module) -> tuple:
    """The data pointers of what a capture bakes in besides its inputs: ``model``'s parameters and buffers, and the
    tensors its modules hold in tuples or lists (the integration's fused weights; a plain tensor attribute such as
    Qwen2.5-VL's ``rope_deltas``, set anew by each prefill and read outside the step, is left out)."""
    held = [t for m in model.modules() for v in vars(m).values() if isinstance(v, (tuple, list))
            for t in v if isinstance(t, torch.Tensor)]
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers(), *held))


def capture_with(record: Callable, fn: Callable, kwargs: dict) -> Callable[[dict], object]:
    """Record ``fn`` on copies of ``kwargs``' tensors (nested in dicts / lists / tuples too: a mask mapping) with
    ``record(run) -> replay_recording`` and return ``replay(kwargs)``: copy the new tensors in, replay."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten(kwargs)
    where = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    static = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
    replay_recording = record(lambda: fn(**tree_unflatten(static, spec)))

    def replay(kw: dict):
        if where:
            new = tree_flatten(kw)[0]
            torch._foreach_copy_([static[i] for i in where], [new[i] for i in where])
        return replay_recording()
    return replay


def cuda_record(run: Callable) -> Callable[[], object]:
    """One CUDA graph of ``run()`` (its own memory pool); returns what replays it and gives the captured output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = run()

    def replay():
        graph.replay()
        return out
    return replay


def _cuda_capture(fn: Callable, kwargs: dict) -> Callable[[dict], object]:
    return capture_with(cuda_record, fn, kwargs)


class StepGraphs:
    """``fn`` (the compiled step) behind CUDA graphs captured per ``signature``; ``capture`` is swappable for
    tests (``capture(fn, kwargs) -> replay``)."""

    def __init__(self, fn: Callable, capture: Optional[Callable] = None):
        self.fn = fn
        self.capture = capture or _cuda_capture
        self.graphs: Dict[tuple, object] = {}
        self._weights: Optional[tuple] = None

    def begin(self, model: torch.nn.Module) -> None:
        """Before a ``generate``: drop every graph when ``model``'s weights moved since the last one."""
        key = weights_key(model)
        if key != self._weights:
            self.graphs.clear()
            self._weights = key

    def __call__(self, *args, **kwargs):
        if args:  # transformers calls the step with keywords only; anything else runs as compiled
            return self.fn(*args, **kwargs)
        key = signature(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            self.graphs[key] = _SEEN
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
