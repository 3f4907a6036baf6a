"""``integrations/step_graph.py``: the decode step replayed from graphs the integration captures. CPU: the
bookkeeping with an injected capture that replays by running the step on the captured inputs, and the wiring
through ``generate`` on the tiny Qwen2.5-VL (dynamo's eager backend). GPU: real CUDA graphs, same tokens."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

from qwen_tiny import tiny_model, visual_inputs
from sparsevila_ops.integrations import qwen2_5_vl as sv
from sparsevila_ops.integrations import step_graph as sg


class FakeCapture:
    """``capture(fn, kwargs)`` as the integration's (``capture_with``) with a recording that replays by running the
    step on the captured inputs (what a graph computes), asserting that the step changed no host state of the
    objects passed (a graph's replay would not change it)."""

    def __init__(self):
        self.captures, self.replays = 0, 0

    def __call__(self, fn, kwargs):
        self.captures += 1
        objs = [v for v in kwargs.values() if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)]

        def record(run):
            def replay():
                self.replays += 1
                before = [_host_state(o) for o in objs]
                out = run()
                assert [_host_state(o) for o in objs] == before, "the step changed host state a replay would not"
                return out
            return replay
        return sg.capture_with(record, fn, kwargs)


def _host_state(obj):
    return {k: copy.copy(v) for k, v in vars(obj).items()
            if not isinstance(v, torch.Tensor) and not (isinstance(v, (list, tuple)) and v
                                                        and isinstance(v[0], (torch.Tensor, torch.nn.Module)))
            and not callable(v) and not isinstance(v, torch.nn.Module)}


def test_first_call_runs_second_captures_then_replays():
    calls = []

    def step(x, n=1):
        calls.append(x.shape)
        return x * 2 + n
    cap = FakeCapture()
    g = sg.StepGraphs(step, capture=cap)
    a, b = torch.randn(3), torch.randn(3)
    assert torch.equal(g(x=a), a * 2 + 1) and cap.captures == 0  # eager: compiles there
    assert torch.equal(g(x=b), b * 2 + 1) and (cap.captures, cap.replays) == (1, 1)
    assert torch.equal(g(x=a), a * 2 + 1) and (cap.captures, cap.replays) == (1, 2)
    g(x=torch.randn(4))  # a new shape: eager first
    g(x=a, n=2)  # a new scalar: a new signature
    assert cap.captures == 1 and len(g.graphs) == 3
    assert torch.equal(g(a), a * 2 + 1)  # positional calls run compiled, never captured
    assert g(x=a[::2].clone()) is not None and g(x=torch.randn(6)[::3]) is not None  # strides differ: new keys
    assert len(g.graphs) == 5
    class Host:
        n = 0

    def counts(x, obj):  # host state a replay would not advance: the fake capture refuses it
        obj.n += 1
        return x
    bad, host = sg.StepGraphs(counts, capture=FakeCapture()), Host()
    bad(x=a, obj=host)
    with pytest.raises(AssertionError, match="host state"):
        bad(x=a, obj=host)
    nested = sg.StepGraphs(lambda m: m["a"][0] + 1, capture=cap)
    for i in range(3):  # a tensor inside a dict / list reaches the capture's copy
        x = torch.full((2,), float(i))
        assert torch.equal(nested(m={"a": [x]}), x + 1)


def test_objects_key_on_their_buffers_and_weights_drop_graphs():
    class Cache:
        def __init__(self):
            self.k, self.pos = torch.zeros(4), [torch.zeros(1)]

    cache = Cache()
    key = sg.signature({"cache": cache, "x": torch.zeros(2)})
    assert key == sg.signature({"x": torch.ones(2), "cache": cache})
    cache.k = torch.zeros(4)  # reallocated: graphs over the old buffer must not replay
    assert sg.signature({"cache": cache, "x": torch.zeros(2)}) != key
    cache.graph_key = lambda: ("path", cache.k.data_ptr())  # the object names what a step depends on
    assert sg.signature({"cache": cache})[0][1][2] == ("path", cache.k.data_ptr())
    assert sg.signature({"mask": {"full": None, "x": torch.zeros(2)}}) != sg.signature({"mask": {"full": None}})

    lin = torch.nn.Linear(2, 2)
    g = sg.StepGraphs(lambda x: lin(x), capture=FakeCapture())
    g.begin(lin)
    g(x=torch.randn(1, 2))
    g.begin(lin)
    assert len(g.graphs) == 1
    lin.weight = torch.nn.Parameter(torch.randn(2, 2))
    g.begin(lin)
    assert g.graphs == {}
    g(x=torch.randn(1, 2))
    lin.__dict__["fused"] = (torch.randn(4, 2), None)  # a fused weight (a tuple in the module's attributes)
    g.begin(lin)
    assert g.graphs == {}
    g(x=torch.randn(1, 2))
    lin.rope_deltas = torch.zeros(1)  # a plain tensor attribute: not a weight
    g.begin(lin)
    assert len(g.graphs) == 1


def test_graphs_hold_no_object_of_the_step_and_die_with_it():
    """A captured step keeps its copies of the tensors, not the objects passed (a cache's buffers are freed when
    the cache is); the output's objects are the call's own; a signature's graph is dropped when its object is
    collected; an object without weak references is held instead (its identity is never reused)."""
    import gc
    import weakref

    def record_once(run):  # what cuda_record keeps: the output of one run, not ``run``
        out = run()
        return lambda: out

    class Cache:
        def __init__(self):
            self.buf = torch.zeros(3)

        def graph_key(self):
            return (self.buf.data_ptr(),)

    def step(x, cache):
        cache.buf.add_(1)  # device-side state only: what a replay would also do
        return {"logits": x * 2, "cache": cache, "n": 3}
    g = sg.StepGraphs(step, capture=lambda fn, kw: sg.capture_with(record_once, fn, kw))
    cache = Cache()
    for _ in range(3):  # eager, capture + replay, replay
        out = g(x=torch.randn(2), cache=cache)
        assert out["cache"] is cache and out["n"] == 3
    assert len(g.graphs) == 1
    dead = weakref.ref(cache)
    del cache, out
    gc.collect()
    assert dead() is None and g.graphs == {}

    class Slots:
        __slots__ = ("buf",)

    pinned = Slots()
    class Plain:  # no graph_key: keyed on its tensors' addresses, and dropped with it too
        def __init__(self):
            self.buf = torch.zeros(3)

    g(x=torch.randn(2), cache=Plain())
    gc.collect()
    assert g.graphs == {}
    held = sg.StepGraphs(lambda x, obj: x, capture=FakeCapture())
    held(x=torch.randn(2), obj=pinned)
    assert held._pinned == [pinned] and len(held.graphs) == 1
    held.begin(torch.nn.Linear(1, 1))
    assert held._pinned == [] and held.graphs == {}


def _eager_compile():
    cfg = CompileConfig(backend="eager", mode=None, options={"triton.cudagraphs": False})
    cfg._compile_all_devices = True
    return cfg


def _without_then_with_step_graph(model, inputs, sparsity, runs, **kw):
    """Tokens of one ``generate`` enabled without ``step_graph`` (inductor's CUDA-graph trees on the GPU), then of
    ``runs`` generates with it."""
    sv.enable(model, *sparsity)
    with torch.no_grad():
        want = model.generate(**inputs, **kw)
    sv.disable(model)
    torch._dynamo.reset()
    sv.enable(model, *sparsity, step_graph=True)
    try:
        with torch.no_grad():
            got = [model.generate(**inputs, **kw) for _ in range(runs)]
    finally:
        sv.disable(model)
        torch._dynamo.reset()
    assert "get_compiled_call" not in model.__dict__
    return want, got


@pytest.mark.parametrize("sparsity", [(0.0, 0.0), (0.5, 0.9)])
def test_generate_replays_the_step_with_the_same_tokens(monkeypatch, sparsity):
    """Through ``generate`` (5 decode steps each): the first call compiles, the second captures, the rest and the
    next ``generate``'s replay; the tokens equal the uncaptured compiled decode's, and no step changes host state
    of the cache."""
    cap = FakeCapture()
    monkeypatch.setattr(sg, "_cuda_capture", cap)
    want, got = _without_then_with_step_graph(tiny_model(seed=4), visual_inputs(seed=5), sparsity, 2,
                                              max_new_tokens=6, do_sample=False, compile_config=_eager_compile())
    assert all(torch.equal(g, want) for g in got) and (cap.captures, cap.replays) == (1, 4 + 5)


def test_generate_replays_a_left_padded_sampled_batch_with_the_same_tokens(monkeypatch):
    """A batch of two left-padded prompts, sampled with one seed: the replayed step gives the uncaptured compiled
    decode's tokens (the sampling happens outside the step, on the same logits)."""
    from qwen_tiny import batch_of_two
    cap = FakeCapture()
    monkeypatch.setattr(sg, "_cuda_capture", cap)
    model, inputs = tiny_model(seed=6), batch_of_two()
    real_generate = type(model).generate

    def seeded(self, *a, **k):  # the same sampling stream for every generate
        torch.manual_seed(11)
        return real_generate(self, *a, **k)
    monkeypatch.setattr(type(model), "generate", seeded)
    want, got = _without_then_with_step_graph(model, inputs, (0.5, 0.9), 2, max_new_tokens=5, do_sample=True,
                                              top_k=20, compile_config=_eager_compile())
    assert all(torch.equal(g, want) for g in got) and cap.captures == 1 and cap.replays == 3 + 4


def test_step_graph_needs_cuda_graph():
    model = tiny_model()
    with pytest.raises(ValueError, match="step_graph captures the compiled decode step: it needs cuda_graph=True"):
        sv.enable(model, step_graph=True, cuda_graph=False)


def test_step_graph_needs_the_model_on_one_device():
    model = tiny_model()
    model.lm_head.to("meta")  # as a device_map split leaves it: parameters on two devices
    with pytest.raises(ValueError, match=r"one CUDA graph, which runs on one device; the model's parameters are "
                                         r"on cpu, meta \(a device_map split\)"):
        sv.enable(model, step_graph=True)
    sv.enable(model, cuda_graph=True)  # inductor's trees decide per graph; nothing to refuse
    sv.disable(model)


def test_a_capture_needs_the_step_on_one_cuda_device():
    with pytest.raises(ValueError, match=r"must be on one CUDA device; got none on CUDA"):
        sg.step_device({"input_ids": torch.ones(1, 1), "cache": {"k": [torch.ones(1)]}})


def test_sparsevila_cache_key_follows_its_path_and_buffers():
    from sparsevila_ops.integrations.cache import SparseVILACache
    cache = SparseVILACache(2, 8)
    cache._allocate(torch.empty(1, 2, 0, 4))
    key = cache.graph_key()
    cache.sparse = True  # decode reads the packed cache: another graph
    assert cache.graph_key() != key
    cache.sparse = False
    cache._grow(16)  # reallocated buffers: another graph
    assert cache.graph_key() != key


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [(0.0, 0.0), (0.5, 0.9)])
def test_generate_replays_real_cuda_graphs(monkeypatch, sparsity):
    """On the GPU (inductor without its CUDA-graph trees, the integration's graphs): the tokens of the default
    compiled decode (inductor's trees), one capture reused by the next two ``generate`` calls."""
    calls = []
    real = sg._cuda_capture
    monkeypatch.setattr(sg, "_cuda_capture", lambda fn, k: calls.append(1) or real(fn, k))
    want, got = _without_then_with_step_graph(tiny_model(seed=4, device="cuda", dtype=torch.bfloat16),
                                              visual_inputs(seed=5, device="cuda", dtype=torch.bfloat16), sparsity,
                                              3, max_new_tokens=8, do_sample=False)
    assert all(torch.equal(g, want) for g in got) and len(calls) == 1
