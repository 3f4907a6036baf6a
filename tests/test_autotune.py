"""sparsevila_ops.autotune: the kernel-config seam, the tables, the tuner and its command line.

CPU: a fake kernel (``out = x * scale``) with a fake timer exercises bucketing, the cache round trip, stale
tables, the lookup order, warm lookups, the capture / compile guards, pruning, verification, the confirmation of a
winner, output resets and compiling the candidates ahead (the fake's warmup hook); one real kernel (``append_kv``,
under the interpreter) is tuned end to end. GPU (``gpu``): the CLI tunes a kernel into a temp
cache and a new process uses the table.
"""
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import sparsevila_ops as so
from sparsevila_ops import autotune
from sparsevila_ops.autotune import cli, problems, tables, tuner
from sparsevila_ops.autotune import tunable as seam
from sparsevila_ops.autotune.problems import Problem
from sparsevila_ops.autotune.tunable import Tunable, bucket, gpu_name

ROOT = Path(__file__).resolve().parent.parent
TRITON_OPS = sorted(op for op, backend in autotune.KERNELS if backend == "triton")


@pytest.fixture(autouse=True)
def tmp_tables(tmp_path, monkeypatch):
    """Every test gets an empty user cache and shipped-table folder of its own, and a fresh lookup state."""
    monkeypatch.setenv("SPARSEVILA_AUTOTUNE_CACHE", str(tmp_path / "cache" / "autotune.json"))
    monkeypatch.delenv("SPARSEVILA_AUTOTUNE", raising=False)
    monkeypatch.setattr(tables, "SHIPPED_DIR", tmp_path / "shipped")
    tables.reset()
    yield
    tables.reset()


class FakeKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    n: int


class Fake:
    """``out = x * scale`` (``accumulate``: ``out += x * scale``) with a tile that changes nothing but the time
    the fake timer reports; ``scale`` 3 is a wrong config. ``calls`` records the configs launched."""

    DEFAULT = {"scale": 2.0, "tile": 16}
    SPACE = [{"scale": 2.0, "tile": t} for t in (8, 16, 32, 64)] + [{"scale": 3.0, "tile": 4}]

    def __init__(self, path: Path, accumulate: bool = False, resources=None, source: str = "# fake kernel v1\n"):
        path.write_text(source)
        self.calls, self.accumulate = [], accumulate
        self.tunable = Tunable("fake_op", "triton", [path], key=self.key_fields, key_type=FakeKey,
                               space=lambda key: self.SPACE, default=lambda key: dict(self.DEFAULT),
                               launch=self.launch, buckets=("n",), resources=resources)

    @staticmethod
    def key_fields(x, out):
        return gpu_name(x.device), x.dtype, x.shape[0]

    def key(self, x, out):
        return self.tunable.key(x, out)

    def launch(self, x, out, cfg):
        self.calls.append(cfg)
        if self.accumulate:
            out.add_(x * cfg["scale"])
        else:
            out.copy_(x * cfg["scale"])

    def reference(self, x, out):
        if self.accumulate:
            out.add_(x * 2.0)
        else:
            out.copy_(x * 2.0)

    def timer(self, cost):
        """A timer that launches set 0 once and reports ``cost[tile]`` ms for the config it ran."""
        def time(run, n_sets):
            run(0)
            return cost[self.calls[-1]["tile"]]
        return time


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = Fake(tmp_path / "fake_kernel.py")
    monkeypatch.setitem(problems.PROBLEMS, "fake_op", Problem((1,), f.reference, None, {}))
    return f


def _args(n=4):
    x = torch.arange(n, dtype=torch.float32) + 1
    return x, torch.zeros(n)


COST = {4: 0.1, 8: 1.0, 16: 2.0, 32: 0.5, 64: 3.0}  # the wrong config (tile 4) would be the fastest
TINY = {"visual_salience.lse": {"n": 8, "H": 2, "D": 16}, "visual_salience.colsum": {"n": 8, "H": 2, "D": 16},
        "visual_salience": {"n": 8, "H": 2, "D": 64},
        "prefill_attention": {"Hq": 4, "Hk": 2, "D": 16, "n": 8},
        "kv_relevance": {"Hq": 4, "Hk": 2, "D": 16, "rows": 2, "n": 8},
        "select_kv": {"L": 2, "Hk": 2, "n": 16, "prefix": 2, "suffix": 2},
        "pack_kv": {"L": 2, "Hk": 2, "D": 16, "n": 16, "prefix": 2, "suffix": 2, "slack": 4},
        "decode_attention": {"Hq": 4, "Hk": 2, "D": 16, "n": 8},
        "sparse_decode_attention": {"Hq": 4, "Hk": 2, "D": 16, "T": 16, "n": 4},
        "append_kv": {"Hk": 2, "D": 16, "cap": 8}, "rope_append_kv": {"Hq": 4, "Hk": 2, "D": 16, "cap": 8},
        "w4a16_linear": {"M": 2, "N": 20, "K": 256},
        "gemv": {"M": 2, "N": 20, "K": 64, "glu": True, "bias": True}}


def faster_in_order(monkeypatch, t: Tunable, args: tuple):
    """A timer under which each candidate of ``t`` on ``args`` is faster than the one before, whenever it is
    timed (it sees which config ran through ``t.launch``): the last candidate wins and is confirmed."""
    cands, ran, launch = tuner.candidates(t, t.key(*args)), [], t.launch
    monkeypatch.setattr(t, "launch", lambda *a: ran.append(a[-1]) or launch(*a))
    return lambda run, n: run(0) or float(len(cands) - cands.index(ran[-1]))


# --- the seam -------------------------------------------------------------------------------------------------------

def test_bucket_is_the_power_of_two_at_or_below():
    assert [bucket(n) for n in (0, 1, 2, 3, 8191, 8192, 8448, 16383)] == [0, 1, 2, 2, 4096, 8192, 8192, 8192]


def test_table_key_buckets_sizes_while_the_default_sees_them_exactly():
    from sparsevila_ops.triton_kernels.decode import DecodeKey
    dec = autotune.kernel("decode_attention")
    a = DecodeKey("NVIDIA H200", torch.bfloat16, 128, 7, 1, 1, 2100, 132)
    b = DecodeKey("NVIDIA H200", torch.bfloat16, 128, 7, 1, 1, 4000, 132)
    c = DecodeKey("NVIDIA H200", torch.bfloat16, 128, 7, 1, 1, 4096, 132)
    assert dec.table_key(a) == dec.table_key(b) == "dtype=bfloat16,D=128,G=7,B=1,Hk=1,cap=2048,sms=132"
    assert dec.table_key(c) != dec.table_key(a)
    assert dec.default(a)["NUM_SPLITS"] == 66 and dec.default(b)["NUM_SPLITS"] == 125  # cdiv(cap, 32)


def test_key_describes_the_call():
    q, k, v, lengths, scale, out, lse = autotune.make_args(
        "decode_attention", {"B": 3, "Hq": 8, "Hk": 2, "D": 40, "n": 50, "slack": 6, "dtype": "float16"}, "cpu")
    key = autotune.kernel("decode_attention").key(q, k, v, lengths, scale, out, lse)
    assert key == ("cpu", torch.float16, 40, 4, 3, 2, 56, 4)
    assert key._fields[0] == "gpu"


def test_sparse_decode_key_counts_the_gathered_keys_not_the_cache_positions():
    """Two gathers of 409 and 9830 keys from one 32k cache are different work: different keys, each default split
    over the keys it reads."""
    sparse = autotune.kernel("sparse_decode_attention")
    keys = []
    for n in (409, 9830):
        args = autotune.make_args("sparse_decode_attention", {"Hq": 8, "Hk": 2, "D": 16, "T": 32768, "n": n}, "cpu")
        keys.append(sparse.key(*args))
    assert [k.n for k in keys] == [409, 9830] and keys[0]._fields[-2] == "n"
    assert sparse.table_key(keys[0]).endswith("Hk=2,n=256,sms=4") and sparse.table_key(keys[1]).endswith("n=8192,sms=4")
    h200 = dict(sms=132, dtype=torch.bfloat16, D=128)

    def default(n, Hk, B=1):
        cfg = sparse.default(keys[0]._replace(n=n, Hk=Hk, B=B, **h200))
        return cfg["NUM_SPLITS"], cfg["BLOCK_N"]
    assert default(409, 4) == (13, 32)  # splits of one 32-key tile each, not 64 slices of the 8k cache
    assert default(6553, 4) == (66, 64)  # ~99 keys per slice at 2 programs per SM: >= 3 tiles, twice the tile
    assert default(6553, 32) == (17, 64)  # ~728 keys per slice: twice the tile, ~4 programs per SM
    assert default(1638, 4, B=8) == (17, 64)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_kernel_declares_a_complete_seam(op):
    """Tiny arguments of each op: the default is the first candidate, every candidate sets the default's
    parameters (``maxnreg`` is an optional cap), and the table key is ``field=value`` pairs without the GPU."""
    args = autotune.make_args(op, TINY[op], "cpu")
    t = autotune.kernel(op)
    space = autotune.config_space(op, *args)
    assert space[0] == autotune.default_config(op, *args) and len(space) > 1
    assert all(set(space[0]) - {"maxnreg"} <= set(c) for c in space)
    key = t.key(*args)
    assert key.gpu == "cpu" and "cpu" not in t.table_key(key)
    assert [p.split("=")[0] for p in t.table_key(key).split(",")] == list(key._fields[1:])
    assert autotune.lookup(op, *args) == (space[0], autotune.DEFAULT)


def test_run_with_config_completes_a_partial_config_from_the_default(fake, monkeypatch):
    monkeypatch.setattr(autotune, "kernel", lambda op, backend="triton": fake.tunable)
    x, out = _args()
    autotune.run_with_config("fake_op", {"tile": 64}, x, out)
    assert fake.calls[-1] == {"scale": 2.0, "tile": 64} and torch.equal(out, 2 * x)


def test_gpu_name_asks_the_device_once_per_device(monkeypatch):
    """Keys are built on every launch: the name and SM count are remembered per device, except for a CUDA device
    without an index (the current one, which may change)."""
    from sparsevila_ops import _device
    asked = []
    monkeypatch.setattr(_device, "_index", lambda device: 0 if device.index is None else device.index)
    monkeypatch.setattr(_device, "_gpu_name", lambda index: asked.append(index) or "NVIDIA H200")
    monkeypatch.setattr(_device, "_sm_count", lambda index: asked.append(-index) or 132)
    _device._forget()
    try:
        devices = [torch.device(d) for d in ("cuda:1", "cuda:1", "cuda", "cuda", "cpu", "cpu")]
        assert [gpu_name(d) for d in devices] == ["NVIDIA H200"] * 4 + ["cpu"] * 2
        assert [_device.sm_count(d) for d in devices] == [132] * 4 + [4] * 2
        assert asked == [1, 0, 0, -1, 0, 0]
    finally:
        _device._forget()  # the fake answers are not the real devices'


@pytest.mark.parametrize("name", sorted(f"{op}/{backend}" for op, backend in autotune.KERNELS))
def test_a_warm_lookup_builds_the_key_and_hits_the_memo(name, monkeypatch):
    """After a key's first lookup, ``Tunable.config`` (every launch) does not run the lookup chain: it costs the
    key's plain tuple of fields and one dict hit (bench/autotune.py's lookup µs); the NamedTuple ``Tunable.key``
    returns has the same fields."""
    op, backend = name.split("/")
    t, args = autotune.kernel(op, backend), autotune.make_args(op, TINY[op], "cpu")
    cfg = t.config(args)
    key = t.key(*args)
    assert isinstance(key, t.key_type) and key == t.key_fields(*args) and type(t.key_fields(*args)) is tuple

    def fail(*a):
        raise AssertionError("called on a warm key")
    monkeypatch.setattr(tables, "resolve", fail)
    monkeypatch.setattr(t, "key_type", type("NoKey", (), {"_make": fail}))
    assert t.config(args) is cfg
    t._memo.clear()
    with pytest.raises(AssertionError, match="warm key"):  # the patches are live: a cold key runs the chain
        t.config(args)


# --- tables ---------------------------------------------------------------------------------------------------------

def test_cache_path_env(monkeypatch, tmp_path):
    assert tables.cache_path() == tmp_path / "cache" / "autotune.json"
    monkeypatch.delenv("SPARSEVILA_AUTOTUNE_CACHE")
    monkeypatch.setenv("SPARSEVILA_CACHE_DIR", str(tmp_path / "c"))
    assert tables.cache_path() == tmp_path / "c" / "autotune.json"
    monkeypatch.delenv("SPARSEVILA_CACHE_DIR")
    assert tables.cache_path() == Path.home() / ".cache" / "sparsevila_ops" / "autotune.json"


def test_cache_round_trip(fake):
    x, out = _args()
    r = tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    assert r.config == {"scale": 2.0, "tile": 32} and r.ms == 0.5 and r.default_ms == 2.0
    data = json.loads(tables.cache_path().read_text())
    table = data["tables"]["cpu"]
    assert table["meta"] == tables.current_meta("cpu")
    section = table["kernels"]["fake_op/triton"]
    assert section["source"] == fake.tunable.source_hash
    assert section["entries"]["dtype=float32,n=4"] == {"config": r.config, "us": 500.0, "default_us": 2000.0}
    tables.reset()  # a new process
    assert tables.lookup(fake.tunable, fake.key(x, out)) == (r.config, tables.USER)
    fake.tunable(*_args(7))  # n = 7 falls in the same bucket
    assert fake.calls[-1] == r.config


def test_lookup_reads_the_files_once(fake, monkeypatch):
    x, out = _args()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    tables.reset()
    fake.tunable(x, out)

    def no_io(path):
        raise AssertionError(f"file read after the first lookup: {path}")
    monkeypatch.setattr(tables, "_read", no_io)
    fake.tunable(*_args(5))  # another exact key: the table is in memory
    fake.tunable(*_args(64))  # a key no table has: the default, still without reading
    assert fake.calls[-2] == {"scale": 2.0, "tile": 32} and fake.calls[-1] == Fake.DEFAULT


@pytest.mark.parametrize("field", ["sparsevila_ops", "torch", "triton", "gpu"],
                         ids=["package", "torch", "triton", "gpu_name"])  # an id "gpu" would read as the marker
def test_stale_table_is_ignored_with_one_log_line(fake, field, caplog):
    x, out = _args()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    data = json.loads(tables.cache_path().read_text())
    data["tables"]["cpu"]["meta"][field] = "other"
    tables.cache_path().write_text(json.dumps(data))
    tables.reset()
    with caplog.at_level(logging.WARNING, logger="sparsevila_ops.autotune"):
        for n in (4, 5, 6):
            fake.tunable(*_args(n))
    assert fake.calls[-1] == Fake.DEFAULT
    assert len(caplog.records) == 1 and f"tuned with {field} 'other'" in caplog.records[0].getMessage()


@pytest.mark.parametrize("field,used", [("sparsevila_ops", True), ("torch", True), ("triton", False),
                                         ("gpu", False)], ids=["package", "torch", "triton", "gpu_name"])
def test_shipped_table_needs_only_the_same_gpu_and_triton(fake, field, used, caplog):
    x, out = _args()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    shipped = tables.export("cpu")
    table = json.loads(shipped.read_text())
    table["meta"][field] = "other"
    shipped.write_text(json.dumps(table))
    tables.clear()
    with caplog.at_level(logging.WARNING, logger="sparsevila_ops.autotune"):
        where = tables.lookup(fake.tunable, fake.key(x, out))[1]
    assert where == (tables.SHIPPED if used else tables.DEFAULT)
    assert used or f"tuned with {field} 'other'" in caplog.records[0].getMessage()


def test_entries_of_a_changed_kernel_source_are_ignored_with_one_log_line(fake, tmp_path, caplog):
    x, out = _args()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    changed = Fake(tmp_path / "fake_kernel.py", source="# fake kernel v2\n")  # as a new process imports it
    tables.reset()
    with caplog.at_level(logging.WARNING, logger="sparsevila_ops.autotune"):
        changed.tunable(x, out)
        changed.tunable(*_args(5))
    assert changed.calls == [Fake.DEFAULT] * 2
    assert len(caplog.records) == 1 and "kernel source changed" in caplog.records[0].getMessage()


def test_lookup_order_user_then_shipped_then_default(fake):
    x, out = _args()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None)
    shipped = tables.export("cpu")  # the shipped format, in this test's shipped folder
    assert shipped == tables.SHIPPED_DIR / "cpu.json"
    assert json.loads(shipped.read_text()) == json.loads(tables.cache_path().read_text())["tables"]["cpu"]
    tables.clear()
    tuner.tune(fake.tunable, (x, out), timer=fake.timer({**COST, 8: 0.2}), limits=None)
    tables.reset()
    key, other = fake.key(x, out), fake.key(*_args(64))
    assert tables.lookup(fake.tunable, key) == ({"scale": 2.0, "tile": 8}, tables.USER)
    assert tables.lookup(fake.tunable, other) == (Fake.DEFAULT, tables.DEFAULT)
    tables.clear()
    assert tables.lookup(fake.tunable, key) == ({"scale": 2.0, "tile": 32}, tables.SHIPPED)


# --- the tuner ------------------------------------------------------------------------------------------------------

def test_verification_rejects_a_wrong_candidate_before_timing_it(fake):
    x, out = _args()
    timed = []
    timer = fake.timer(COST)
    r = tuner.tune(fake.tunable, (x, out), timer=lambda run, n: timed.append(1) or timer(run, n), limits=None)
    wrong = [t for t in r.trials if t.config["scale"] == 3.0]
    assert len(wrong) == 1 and wrong[0].status == tuner.WRONG and wrong[0].ms is None
    assert len([t for t in r.trials if t.status == tuner.OK]) == 4
    assert len(timed) == 4 + 2 * tuner.CONFIRM_ROUNDS  # each correct config, then the default and the winner again
    assert r.config == {"scale": 2.0, "tile": 32}


def scripted_timer(fake, confirm):
    """COST for the 4 correct configs' trials, then each tile's next time from ``confirm[tile]``; ``timed``
    records the tiles in the order they were timed."""
    timed = []

    def timer(run, n_sets):
        run(0)
        timed.append(fake.calls[-1]["tile"])
        return COST[timed[-1]] if len(timed) <= 4 else confirm[timed[-1]].pop(0)
    return timer, timed


def test_a_winner_that_loses_the_confirmation_leaves_the_default(fake):
    """Tile 32 wins the trials (0.5 ms vs the default's 2), but timed again, interleaved, it is only 1 % faster
    in the medians: the default stays, reported at its confirmation median."""
    x, out = _args()
    timer, timed = scripted_timer(fake, {16: [1.0, 1.2, 0.9], 32: [0.99, 0.9, 5.0]})
    r = tuner.tune(fake.tunable, (x, out), timer=timer, limits=None)
    assert timed == [16, 8, 32, 64] + [16, 32, 32, 16, 16, 32]  # which goes first alternates
    assert r.config == Fake.DEFAULT and r.ms == r.default_ms == 1.0
    trials = {t.config["tile"]: t for t in r.trials}
    assert trials[16].confirm_ms == [1.0, 1.2, 0.9] and trials[32].confirm_ms == [0.99, 0.9, 5.0]
    assert trials[32].ms == 0.5 and trials[32].final_ms == 0.99 and trials[8].confirm_ms == []
    entry = json.loads(tables.cache_path().read_text())["tables"]["cpu"]["kernels"]["fake_op/triton"]["entries"]
    assert entry["dtype=float32,n=4"] == {"config": Fake.DEFAULT, "us": 1000.0, "default_us": 1000.0}


def test_a_winner_that_confirms_is_kept(fake):
    """The medians of the confirmation (one slow outlier of the winner changes nothing) keep tile 32."""
    timer, timed = scripted_timer(fake, {16: [2.0, 2.2, 1.9], 32: [0.6, 3.0, 0.5]})
    r = tuner.tune(fake.tunable, _args(), timer=timer, limits=None, store=False)
    assert len(timed) == 4 + 2 * tuner.CONFIRM_ROUNDS
    assert r.config == {"scale": 2.0, "tile": 32} and (r.ms, r.default_ms) == (0.6, 2.0)


def test_measure_rounds_time_every_correct_config_again_interleaved(fake):
    """``rounds`` 3: after one timing each, the correct configs (not the wrong tile 4) are timed three more times,
    in reverse order every other round; ``final_ms`` is the median of those rounds (an outlier changes nothing)."""
    timer, timed = scripted_timer(fake, {16: [2.0, 9.0, 2.2], 8: [1.0, 1.1, 0.9], 32: [0.7, 0.6, 0.5],
                                         64: [3.0, 3.0, 3.0]})
    trials = tuner.measure(fake.tunable, _args(), timer=timer, limits=None, rounds=3)
    assert timed == [16, 8, 32, 64] + [16, 8, 32, 64] + [64, 32, 8, 16] + [16, 8, 32, 64]
    final = {t.config["tile"]: t.final_ms for t in trials if t.status == tuner.OK}
    assert final == {16: 2.2, 8: 1.0, 32: 0.6, 64: 3.0}
    assert [t.confirm_ms for t in trials if t.status != tuner.OK] == [[]]
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        tuner.measure(fake.tunable, _args(), timer=timer, limits=None, rounds=-1)


@pytest.mark.parametrize("cost", [{**COST, 16: 0.2}, {**COST, 8: 2.5, 32: 1.97}], ids=["fastest", "within_min_gain"])
def test_the_default_winning_the_trials_is_not_timed_again(fake, cost):
    """Fastest, or faster candidates within ``MIN_GAIN``: the trials' times stand, nothing is confirmed."""
    timed = []
    timer = fake.timer(cost)
    r = tuner.tune(fake.tunable, _args(), timer=lambda run, n: timed.append(1) or timer(run, n), limits=None,
                   store=False)
    assert r.config == Fake.DEFAULT and len(timed) == 4 and not any(t.confirm_ms for t in r.trials)
    assert (r.ms, r.default_ms) == (cost[16], cost[16])


def test_long_calls_are_timed_fewer_times_within_the_budget():
    """``cuda_timer``'s replay counts: as asked without a budget or for short calls; within the budget for long
    ones, never fewer than ``MIN_ITERS`` timed replays; the tuner's default timer has the budget."""
    assert tuner.replays_within(250.0, 3, 20, None) == (2, 20)
    assert tuner.replays_within(0.01, 3, 20, 300.0) == (2, 20)
    assert tuner.replays_within(20.0, 3, 20, 300.0) == (0, 15)
    assert tuner.replays_within(10.0, 3, 20, 300.0) == (2, 20)
    assert tuner.replays_within(250.0, 3, 20, 300.0) == (0, tuner.MIN_ITERS)
    assert tuner.replays_within(100.0, 3, 20, 300.0) == (0, 3)
    assert tuner.default_timer(torch.device("cuda")).keywords == {"budget_ms": tuner.TIME_BUDGET_MS}
    with pytest.raises(ValueError, match="CUDA device"):
        tuner.default_timer(torch.device("cpu"))


def test_accumulating_outputs_are_reset_between_trials(tmp_path, monkeypatch):
    f = Fake(tmp_path / "fake_kernel.py", accumulate=True)
    monkeypatch.setitem(problems.PROBLEMS, "fake_op", Problem((1,), f.reference, None, {}))
    x, out = _args()
    out.fill_(float("nan"))  # torch.empty garbage: must not fail the comparison
    trials = tuner.measure(f.tunable, (x, out), timer=f.timer(COST), limits=None)
    assert [t.status for t in trials] == [tuner.OK] * 4 + [tuner.WRONG]


def test_pruning_skips_configs_that_cannot_fit(tmp_path, monkeypatch):
    f = Fake(tmp_path / "fake_kernel.py", resources=lambda key, cfg: (cfg["tile"] * 1024, 200 + cfg["tile"]))
    monkeypatch.setitem(problems.PROBLEMS, "fake_op", Problem((1,), f.reference, None, {}))
    trials = tuner.measure(f.tunable, _args(), timer=f.timer(COST), limits=tuner.Limits(48 * 1024, 255))
    status = {t.config["tile"]: (t.status, t.note) for t in trials}
    assert status[64][0] == tuner.PRUNED and "shared memory" in status[64][1]
    assert status[8][0] == status[16][0] == status[32][0] == tuner.OK
    n = len(f.calls)
    trials = tuner.measure(f.tunable, _args(), timer=f.timer(COST), limits=tuner.Limits(1 << 20, 230))
    status = {t.config["tile"]: (t.status, t.note) for t in trials}
    assert status[32][0] == tuner.PRUNED and "registers" in status[32][1]
    assert {c["tile"] for c in f.calls[n:]} == {4, 8, 16}  # pruned configs are never launched


def test_the_tuner_refuses_arguments_the_tunable_cannot_run(fake):
    x, out = _args()
    fake.tunable._unsupported = lambda x, out: "odd sizes" if x.shape[0] % 2 else None
    with pytest.raises(ValueError, match="odd sizes"):
        tuner.tune(fake.tunable, _args(3), timer=fake.timer(COST), limits=None, store=False)
    assert fake.calls == []  # refused before any launch
    assert tuner.tune(fake.tunable, (x, out), timer=fake.timer(COST), limits=None, store=False).config
    cuda = autotune.kernel("decode_attention", "cuda")
    args = autotune.make_args("decode_attention", {"D": 64, "n": 16, "slack": 0}, "cpu")
    assert "cuda backend cannot run here" in cuda.unsupported(*args)  # no sm_90 GPU: the reason, never a launch
    assert autotune.kernel("decode_attention").unsupported(*args) is None  # no hook: every call is taken


# --- compiling the candidates ahead -----------------------------------------------------------------------------------

def test_precompile_warms_every_unpruned_candidate_up_before_any_launch(tmp_path, monkeypatch):
    """With jobs > 1 (and a GPU: faked here), every candidate that is not pruned is warmed up once, all before the
    first launch; a warmup that fails is passed over. The trials are those of jobs 1, which warms nothing up."""
    f = Fake(tmp_path / "fake_kernel.py", resources=lambda key, cfg: (cfg["tile"] * 1024, 0))
    monkeypatch.setitem(problems.PROBLEMS, "fake_op", Problem((1,), f.reference, None, {}))
    monkeypatch.setattr(seam, "_async_compiles", lambda args: True)
    events = []

    def warmup(x, out, cfg):
        events.append(("warmup", cfg["tile"], threading.get_ident()))
        if cfg["tile"] == 8:
            raise RuntimeError("out of resources")  # its launch works in the fake: it is timed as usual

    def launch(x, out, cfg):
        events.append(("launch", cfg["tile"], threading.get_ident()))
        f.launch(x, out, cfg)

    f.tunable.warmup, f.tunable.launch = warmup, launch
    limits = tuner.Limits(48 * 1024)  # prunes tile 64
    one = tuner.measure(f.tunable, _args(), timer=f.timer(COST), limits=limits, jobs=1)
    assert {e[0] for e in events} == {"launch"}
    events.clear()
    many = tuner.measure(f.tunable, _args(), timer=f.timer(COST), limits=limits, jobs=4)
    me = threading.get_ident()
    assert events[:4] == [("warmup", tile, me) for tile in (16, 8, 32, 4)]  # the default first; 64 is pruned
    assert {e[0] for e in events[4:]} == {"launch"}
    assert [(t.config, t.status, t.ms) for t in many] == [(t.config, t.status, t.ms) for t in one]
    assert [t.status for t in many] == [tuner.OK, tuner.OK, tuner.OK, tuner.PRUNED, tuner.WRONG]


def test_precompile_does_nothing_on_cpu_tensors(fake):
    """CPU tensors run under Triton's interpreter, which compiles nothing: no warmup, whatever ``jobs`` says."""
    args = autotune.make_args("append_kv", {"B": 2, "Hk": 2, "D": 16, "cap": 8}, "cpu")
    lengths = args[4].clone()
    t = autotune.kernel("append_kv")
    t.precompile(args, autotune.config_space("append_kv", *args), jobs=8)
    assert torch.equal(args[4], lengths)  # a warmup under the interpreter would have run the kernel
    warmed = []
    fake.tunable.warmup = lambda x, out, cfg: warmed.append(cfg)
    assert tuner.tune(fake.tunable, _args(), timer=fake.timer(COST), limits=None, jobs=8).config["tile"] == 32
    assert warmed == []


def test_triton_warmup_compiles_instead_of_launching_on_its_thread_only():
    """The hook runs the launcher with this thread's ``kernel[grid](...)`` as Triton warmups; another thread's
    launch meanwhile, and every launch after, is a launch. Triton kernels declare the hook, the CUDA ones none."""
    from triton.runtime.jit import KernelInterface

    class Kernel(KernelInterface):
        def __init__(self):
            self.runs = []

        def run(self, *args, grid, warmup, **kwargs):
            self.runs.append((args, grid, warmup, kwargs))

    k = Kernel()

    def launch(x, cfg):
        k[(x, 2)](x, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        other = threading.Thread(target=lambda: k[(1,)](x))
        other.start()
        other.join()

    Tunable.triton_warmup(launch)(3, {"BLOCK": 16, "num_warps": 4})
    k[(5,)](5)
    assert k.runs == [((3,), (3, 2), True, {"BLOCK": 16, "num_warps": 4}), ((3,), (1,), False, {}),
                      ((5,), (5,), False, {})]
    assert all(autotune.kernel(op).warmup is not None for op in TRITON_OPS)
    assert autotune.kernel("decode_attention", "cuda").warmup is None


def test_resource_estimates_prune_the_prefill_tiles_known_to_spill():
    """bench/NOTES.md: 128 x 64 prefill tiles with 4 warps spill (~100 TFLOP/s), with 8 warps they reach ~500."""
    from sparsevila_ops.triton_kernels.prefill import AttentionKey
    t = autotune.kernel("prefill_attention")
    key = AttentionKey("NVIDIA H100 80GB HBM3", torch.bfloat16, 128, 7, 4, True, 1, 16384, 16384)
    h100 = tuner.Limits(227 * 1024)
    assert tuner.prune_reason(t, key, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), h100) is None
    assert "registers" in tuner.prune_reason(t, key, dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3), h100)


def test_tuning_a_real_kernel_restores_in_place_updates(device, monkeypatch):
    """append_kv bumps ``lengths`` in place: every candidate must be verified from the same state. The fake
    timer makes each candidate faster than the one before, so the last one wins and is used afterwards."""
    shape = {"B": 2, "Hk": 2, "D": 16, "cap": 8, "dtype": "float32"}
    args = autotune.make_args("append_kv", shape, device)
    lengths0 = args[4].clone()
    timer = faster_in_order(monkeypatch, autotune.kernel("append_kv"), args)
    r = autotune.tune("append_kv", args, timer=timer, limits=None)
    assert [t.status for t in r.trials] == [tuner.OK] * len(r.trials) and len(r.trials) > 2
    assert r.config == r.trials[-1].config != r.trials[0].config
    tables.reset()
    k_new, v_new, k_cache, v_cache, lengths = autotune.make_args("append_kv", shape, device, seed=1)
    assert autotune.lookup("append_kv", k_new, v_new, k_cache, v_cache, lengths) == (r.config, autotune.USER)
    with so.use_backend("triton"):
        so.append_kv(k_new, v_new, k_cache, v_cache, lengths)
    assert torch.equal(lengths, lengths0 + 1) and torch.equal(k_cache[:, :, 4], k_new)


# --- tuning on a miss, and where it must not happen ------------------------------------------------------------------

def test_autotune_env_tunes_a_missing_key_on_its_first_launch(fake, monkeypatch):
    monkeypatch.setenv("SPARSEVILA_AUTOTUNE", "1")
    monkeypatch.setattr(tuner, "default_timer", lambda device: fake.timer(COST))
    monkeypatch.setattr(tuner, "device_limits", lambda device: None)
    x, out = _args()
    fake.tunable(x, out)
    assert fake.calls[-1] == {"scale": 2.0, "tile": 32} and torch.equal(out, 2 * x)
    assert tables.lookup(fake.tunable, fake.key(x, out))[1] == tables.USER
    n = len(fake.calls)
    fake.tunable(x, out)
    assert len(fake.calls) == n + 1  # tuned once: the next launch is a lookup


def test_no_tuning_while_a_cuda_graph_is_captured(fake, monkeypatch, caplog):
    monkeypatch.setenv("SPARSEVILA_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tuner, "default_timer", lambda device: pytest.fail("tuned during capture"))
    x, out = _args()
    with caplog.at_level(logging.WARNING, logger="sparsevila_ops.autotune"):
        fake.tunable(x, out)
        fake.tunable(x, out)
    assert fake.calls == [Fake.DEFAULT] * 2 and not tables.cache_path().exists()
    assert len(caplog.records) == 1 and "CUDA graph is being captured" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # capture over: it tunes now
    monkeypatch.setattr(tuner, "default_timer", lambda device: fake.timer(COST))
    monkeypatch.setattr(tuner, "device_limits", lambda device: None)
    fake.tunable(x, out)
    assert fake.calls[-1] == {"scale": 2.0, "tile": 32} and tables.cache_path().exists()


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the first lookup reads the files
def test_no_tuning_while_torch_compile_traces(fake, monkeypatch, caplog):
    monkeypatch.setenv("SPARSEVILA_AUTOTUNE", "1")
    monkeypatch.setattr(tuner, "default_timer", lambda device: pytest.fail("tuned while torch.compile traced"))
    torch._dynamo.reset()
    f = torch.compile(lambda x, out: fake.tunable(x, out), backend="eager")
    with caplog.at_level(logging.WARNING, logger="sparsevila_ops.autotune"):
        for n in (3, 3):
            x, out = _args(n)
            f(x, out)
            assert torch.equal(out, 2 * x)
    assert not tables.cache_path().exists()
    notes = [r.getMessage() for r in caplog.records if "not tuning" in r.getMessage()]
    assert len(notes) == 1 and "torch.compile traces" in notes[0]


# --- command line -----------------------------------------------------------------------------------------------------

def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m sparsevila_ops.autotune")
    assert all(c in out for c in ("tune", "show", "clear", "export", "SPARSEVILA_AUTOTUNE"))
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--op" in out and "--shapes" in out and "qwen2_5_vl" in out and "--jobs" in out


def test_cli_tune_compiles_on_jobs_threads(monkeypatch, tmp_path):
    """``--jobs`` reaches the tuner (default: one thread per CPU, at most 32)."""
    assert cli.parser().parse_args(["tune", "--op", "all"]).jobs == tuner.JOBS == min(32, os.cpu_count())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    make_args = problems.make_args
    monkeypatch.setattr(problems, "make_args", lambda op, shape, device: make_args(op, shape, "cpu"))
    seen = []

    def tune(t, args, jobs):
        seen.append(jobs)
        return tuner.Result(t, t.key(*args), t.default(t.key(*args)), 1e-3, 1e-3)

    monkeypatch.setattr(tuner, "tune", tune)
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps([{"op": "append_kv", "Hk": 2, "D": 16, "cap": 8}]))
    assert cli.main(["tune", "--op", "append_kv", "--shapes", str(path), "--jobs", "3"]) == 0
    assert seen == [3]


def test_cli_tune_resumes_past_keys_the_user_cache_holds(monkeypatch, tmp_path, capsys):
    """A second ``tune`` over the same shapes tunes nothing (an interrupted run resumes); ``--retune`` tunes again."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    make_args = problems.make_args
    monkeypatch.setattr(problems, "make_args", lambda op, shape, device: make_args(op, shape, "cpu"))
    tuned = []

    def tune(t, args, jobs):
        key = t.key(*args)
        tables.store(t, key, t.default(key), 1.0, 1.0)
        tuned.append(t.table_key(key))
        return tuner.Result(t, key, t.default(key), 1e-3, 1e-3)

    monkeypatch.setattr(tuner, "tune", tune)
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps([{"op": "append_kv", "Hk": hk, "D": 16, "cap": 8} for hk in (2, 4)]))
    argv = ["tune", "--op", "append_kv", "--shapes", str(path)]
    assert cli.main(argv) == 0 and len(tuned) == 2
    assert cli.main(argv) == 0 and len(tuned) == 2
    assert "tuned 0 keys (0 failed, 2 already in the cache" in capsys.readouterr().out
    assert cli.main(argv + ["--retune"]) == 0 and len(tuned) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cli_tune_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "sparsevila_ops.autotune", "tune", "--op", "all"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["autotune tune: needs a CUDA GPU (none found here); nothing was tuned"]


def test_cli_show_clear_export(fake, tmp_path, capsys):
    tuner.tune(fake.tunable, _args(), timer=fake.timer(COST), limits=None)
    assert cli.main(["show"]) == 0
    out = capsys.readouterr().out
    assert "fake_op/triton" in out and "n=4" in out and "'tile': 32" in out
    assert cli.main(["export", "--gpu", "cpu", "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["meta"]["gpu"] == "cpu"
    assert cli.main(["export", "--gpu", "NVIDIA H200"]) == 2
    assert "no configs for 'NVIDIA H200'" in capsys.readouterr().err
    assert cli.main(["clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and not tables.cache_path().exists()


def test_presets_cover_every_op_with_valid_shapes():
    from sparsevila_ops.autotune import shapes
    assert {"bench", "siglip", "qwen2_5_vl", "qwen2", "llama2", "all"} <= set(shapes.PRESETS)
    assert {op for op, _ in shapes.PRESETS["all"]} == set(TRITON_OPS) | {"visual_salience"}  # + cuda salience
    for op, shape in shapes.PRESETS["all"]:
        problems.full_shape(op, shape)  # raises on a field the op does not know
    assert {(s["H"], s["D"], s["n"]) for op, s in shapes.PRESETS["siglip"]} == {(16, 72, 729)}


def test_shapes_file(tmp_path):
    from sparsevila_ops.autotune import shapes
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps([{"op": "decode_attention", "n": 4096, "Hq": 32, "Hk": 8}]))
    assert shapes.load(str(path)) == [("decode_attention", {"n": 4096, "Hq": 32, "Hk": 8})]
    with pytest.raises(ValueError, match="preset"):
        shapes.load(str(tmp_path / "missing.json"))


@pytest.mark.gpu
def test_tune_end_to_end_and_a_new_process_uses_the_table(tmp_path):
    """The CLI tunes select_kv at one shape into a temp cache; a new process looks the same call up there."""
    shape = {"L": 4, "Hk": 4, "n": 8192}
    (tmp_path / "shapes.json").write_text(json.dumps([{"op": "select_kv", **shape}]))
    env = dict(os.environ, SPARSEVILA_AUTOTUNE_CACHE=str(tmp_path / "cache.json"))
    proc = subprocess.run([sys.executable, "-m", "sparsevila_ops.autotune", "tune", "--op", "select_kv",
                           "--shapes", str(tmp_path / "shapes.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "cache.json").read_text())["tables"][torch.cuda.get_device_name()]
    (entry,) = table["kernels"]["select_kv/triton"]["entries"].values()
    check = ("import json, sys; from sparsevila_ops import autotune; "
             f"args = autotune.make_args('select_kv', {shape!r}, 'cuda', seed=3); "
             "print(json.dumps(autotune.lookup('select_kv', *args)))")
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [entry["config"], autotune.USER]


# --- the W4A16 GEMV (sparsevila_quant::w4a16_linear) ------------------------------------------------------------------

def test_w4a16_linear_is_tuned_and_the_op_launches_with_the_winner(device, monkeypatch):
    """Every candidate verified against dequantize-then-matmul (here under the interpreter); the fake timer makes
    each faster than the one before, so the last wins. The public op, at another M of the same bucket, then
    launches with it, and is still right."""
    from sparsevila_ops import quant as Q
    from sparsevila_ops.testing import rel_err
    shape = {"M": 3, "N": 24, "K": 512, "bias": True, "dtype": "float16"}
    args = autotune.make_args("w4a16_linear", shape, device)
    timer = faster_in_order(monkeypatch, autotune.kernel("w4a16_linear"), args)
    r = autotune.tune("w4a16_linear", args, timer=timer, limits=None)
    assert [t.status for t in r.trials] == [tuner.OK] * len(r.trials) and len(r.trials) > 2
    assert r.config == r.trials[-1].config != r.trials[0].config
    tables.reset()
    t = autotune.kernel("w4a16_linear")
    launched = []
    launch = t.launch
    monkeypatch.setattr(t, "launch", lambda *a: launched.append(a[-1]) or launch(*a))
    x, qw, s, z, bias, _, _ = autotune.make_args("w4a16_linear", {**shape, "M": 2}, device, seed=1)
    with so.use_backend("triton"):
        y = Q.w4a16_linear(x, Q.W4Weight(qw, s, z, 128), bias)
    assert launched == [r.config]
    ref = x.double() @ Q.dequantize_w4(Q.W4Weight(qw, s, z, 128), torch.float64).t() + bias.double()
    assert rel_err(y, ref) <= 2.0 ** -11 + 1e-4


def test_presets_cover_the_w4a16_linears_of_qwen2_5_and_llama2():
    """Batch 1..8 of every linear shape: fused (bench/gemv4.py; gate_up also with glu) and per module
    (quantize_model_linears)."""
    from sparsevila_ops.autotune import shapes
    nk = lambda preset: {  # noqa: E731
        (s["N"], s["K"], s.get("glu", False)): sorted(
            x["M"] for o, x in shapes.PRESETS[preset]
            if o == "w4a16_linear" and (x["N"], x["K"], x.get("glu", False)) == (s["N"], s["K"], s.get("glu", False)))
        for op, s in shapes.PRESETS[preset] if op == "w4a16_linear"}
    batches = list(range(1, 9))
    assert nk("qwen2") == nk("qwen2_5_vl") == {(n, k, glu): batches for n, k, glu in (
        (4608, 3584, False), (3584, 3584, False), (512, 3584, False), (37888, 3584, False), (18944, 3584, False),
        (3584, 18944, False), (18944, 3584, True))}
    assert nk("llama2") == {(n, k, glu): batches for n, k, glu in (
        (12288, 4096, False), (4096, 4096, False), (22016, 4096, False), (11008, 4096, False), (4096, 11008, False),
        (11008, 4096, True))}
    assert nk("bench") == {(n, k, False): batches for n, k in ((4608, 3584), (3584, 3584), (37888, 3584),
                                                               (3584, 18944))}
    for op, s in shapes.PRESETS["all"]:
        if op == "w4a16_linear":
            assert problems.full_shape(op, s)["group"] == 128


@pytest.mark.gpu
def test_tune_w4a16_linear_on_the_gpu():
    """Qwen2.5-7B's o projection at batch 1: the default and the space verify and time on the GPU."""
    args = autotune.make_args("w4a16_linear", {"M": 1, "N": 3584, "K": 3584}, "cuda")
    r = autotune.tune("w4a16_linear", args)
    assert r.trials[0].status == tuner.OK and r.default_ms is not None and r.ms <= r.default_ms
    assert sum(t.status == tuner.OK for t in r.trials) > len(r.trials) // 2, [(t.config, t.note) for t in r.trials]
    assert autotune.lookup("w4a16_linear", *args) == (r.config, autotune.USER)


def test_shipped_tables_match_the_kernels():
    """Every kernel section of the shipped tables (the real package data) carries the current source hash of its
    kernel: a change to a kernel or its launcher must retune or drop its shipped entries, never leave them to be
    ignored silently at run time."""
    shipped = sorted(Path(autotune.__file__).resolve().parent.joinpath("configs").glob("*.json"))
    assert shipped, "no shipped table"
    for path in shipped:
        for name, section in json.loads(path.read_text())["kernels"].items():
            tunable = autotune.kernel(*name.split("/"))
            assert section["source"] == tunable.source_hash, (
                f"{path.name}: {name} was tuned for another version of its kernel (source {section['source']}, "
                f"now {tunable.source_hash}); retune it or remove the section")


def test_source_hash_follows_the_launcher_and_its_kernels_only():
    """A Tunable's hash covers its launcher, the functions and kernels of the package it reaches and the module
    constants they read; not the key builder or other kernels."""
    from sparsevila_ops.triton_kernels import decode, gemv4
    functions, constants = seam.reached(decode.DECODE.launch)
    names = [f"{f.__module__.rsplit('.', 1)[1]}.{f.__name__}" for f in functions]
    assert names == ["_device._capability", "_device._index", "_device.capability", "_device.use_pdl",
                     "decode._block_d", "decode._block_g", "decode._decode", "decode._decode_combine_kernel",
                     "decode._decode_split_kernel", "decode._launch_decode", "decode.combine_partials"]
    assert constants == {"sparsevila_ops.triton_kernels.decode.LOG2E": repr(decode.LOG2E)}
    assert set(seam.reached(gemv4.W4A16.launch)[1]) >= {"sparsevila_ops.triton_kernels.gemv4.PACK_K",
                                                         "sparsevila_ops.triton_kernels.gemv4.BLOCK_M"}


def test_source_hash_changes_with_a_module_constant(monkeypatch):
    """A constant the launcher reads (here gemv4.BLOCK_M) changes the hash, so stale tuned entries are refused."""
    from sparsevila_ops.triton_kernels import gemv4
    before = gemv4.W4A16.source_hash
    seam_of = dict(key=gemv4.W4A16.key_fields, key_type=gemv4.W4A16.key_type, space=gemv4.W4A16.space,
                   default=gemv4.W4A16.default, launch=gemv4.launch)
    fresh = seam.Tunable("w4a16_linear", "triton", **seam_of)
    assert fresh.source_hash == before
    monkeypatch.setattr(gemv4, "BLOCK_M", gemv4.BLOCK_M * 2)
    assert seam.Tunable("w4a16_linear", "triton", **seam_of).source_hash != before


def test_bench_lookup_times_every_kernel_it_can_run_without_tuning(monkeypatch):
    """``bench.autotune --lookup``: one warm-lookup row per kernel that runs here (on the CPU: the Triton ones,
    through the interpreter's arguments), none tuned."""
    from bench import autotune as bench_autotune
    monkeypatch.setattr(tuner, "tune", lambda *a, **k: pytest.fail("--lookup tunes nothing"))
    grid = {op: [TINY[op]] for op in bench_autotune.GRID}
    rows = bench_autotune.lookups(sorted(grid), device="cpu", grid=grid)
    triton = sorted(f"{op}/triton" for op, backend in autotune.KERNELS if backend == "triton")
    assert sorted(r["op"] for r in rows if r["op"].endswith("/triton")) == triton
    assert all(0 < r["lookup_us"] < 1e3 for r in rows)
