"""Bad input: one case per validation rule of the public API, asserting the exception type and that the message
names the offending argument.

Each case starts from a valid call (``test_valid_base_calls`` proves it runs) and breaks exactly one thing.
"""
from __future__ import annotations

import re

import pytest
import torch

import sparsevila_ops as so

I32 = torch.int32
META = torch.device("meta")


def _i32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=I32)


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# Valid base calls, as keyword dicts. Tiny CPU fp32 tensors (reference backend).
def _salience():
    g = _g()
    return dict(q=torch.randn(12, 2, 8, generator=g), k=torch.randn(12, 2, 8, generator=g),
                cu_seqlens=_i32([0, 5, 12]), max_seqlen=7)


def _prefill():  # 2 segments: m = [2, 4] queries, n = [5, 7] keys; Hq = 4, Hk = 2
    g = _g()
    return dict(q=torch.randn(6, 4, 8, generator=g), k=torch.randn(12, 2, 8, generator=g),
                v=torch.randn(12, 2, 8, generator=g), cu_seqlens_q=_i32([0, 2, 6]), cu_seqlens_k=_i32([0, 5, 12]),
                max_seqlen_q=4, max_seqlen_k=7, rel_rows=_i32([[0, 2], [1, 4]]))


def _kv_relevance():
    d = _prefill()
    d.pop("v")
    d["lse"] = torch.randn(4, 6, generator=_g())
    return d


def _select():
    return dict(scores=torch.randn(2, 2, 10, generator=_g()), vis_start=[1, 0], vis_end=[8, 10], keep=3)


def _pack():  # longest packed row: 1 + 3 + 2 = 6
    g = _g()
    return dict(k=torch.randn(2, 2, 10, 8, generator=g), v=torch.randn(2, 2, 10, 8, generator=g),
                indices=_i32([[[1, 4, 6], [2, 3, 7]], [[0, 5, 9], [1, 2, 3]]]), vis_start=[1, 0], vis_end=[8, 10],
                capacity=8)


def _decode():
    g = _g()
    return dict(q=torch.randn(2, 4, 8, generator=g), k=torch.randn(2, 2, 6, 8, generator=g),
                v=torch.randn(2, 2, 6, 8, generator=g), lengths=_i32([3, 6]))


def _append():
    g = _g()
    return dict(k_new=torch.randn(2, 2, 8, generator=g), v_new=torch.randn(2, 2, 8, generator=g),
                k_cache=torch.randn(2, 2, 6, 8, generator=g), v_cache=torch.randn(2, 2, 6, 8, generator=g),
                lengths=_i32([3, 5]))


def _sparse():
    g = _g()
    return dict(q=torch.randn(2, 4, 8, generator=g), k_cache=torch.randn(2, 2, 10, 8, generator=g),
                v_cache=torch.randn(2, 2, 10, 8, generator=g), indices=_i32([[[0, 3, 9, 1]] * 2] * 2),
                n_valid=_i32([2, 4]))


def _prune():
    return dict(salience=torch.rand(12, generator=_g()), seg_lens=[4, 8], keep_ratio=0.5, group=4)


OPS = {
    "visual_salience": (so.visual_salience, _salience),
    "prefill_attention": (so.prefill_attention, _prefill),
    "kv_relevance": (so.kv_relevance, _kv_relevance),
    "select_kv": (so.select_kv, _select),
    "pack_kv": (so.pack_kv, _pack),
    "decode_attention": (so.decode_attention, _decode),
    "append_kv": (so.append_kv, _append),
    "sparse_decode_attention": (so.sparse_decode_attention, _sparse),
    "prune_visual_tokens": (so.prune_visual_tokens, _prune),
}


@pytest.fixture(autouse=True)
def _reference_backend():
    with so.use_backend("reference"):
        yield


@pytest.mark.parametrize("op", list(OPS))
def test_valid_base_calls(op):
    fn, base = OPS[op]
    fn(**base())


def _expect(op: str, change, exc, *names):
    """Call ``op`` with its base arguments updated by ``change(base)``; expect ``exc`` naming every name."""
    fn, base = OPS[op]
    args = base()
    args.update(change(args))
    with pytest.raises(exc) as info:
        fn(**args)
    msg = str(info.value)
    for name in names:
        assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w])", msg), \
            f"{exc.__name__} message does not name {name!r}: {msg}"


def case(op, change, exc, *names, id):
    return pytest.param(op, change, exc, names, id=id)


def _strided_last(t: torch.Tensor) -> torch.Tensor:
    """The same values with last-dim stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


# ------------------------------------------------------------------------------------------------ wrong dtype
DTYPE_CASES = [
    case("visual_salience", lambda a: dict(q=a["q"].int(), k=a["k"].int()), TypeError, "q", id="salience-q-int"),
    case("visual_salience", lambda a: dict(k=a["k"].half()), TypeError, "k", id="salience-k-vs-q"),
    case("visual_salience", lambda a: dict(cu_seqlens=a["cu_seqlens"].long()), TypeError, "cu_seqlens",
         id="salience-cu-int64"),
    case("prefill_attention", lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError,
         "q", id="prefill-fp64"),
    case("prefill_attention", lambda a: dict(v=a["v"].bfloat16()), TypeError, "v", id="prefill-v-vs-q"),
    case("prefill_attention", lambda a: dict(rel_rows=a["rel_rows"].long()), TypeError, "rel_rows",
         id="prefill-rel-rows-int64"),
    case("kv_relevance", lambda a: dict(lse=a["lse"].half()), TypeError, "lse", id="kv-relevance-lse-fp16"),
    case("select_kv", lambda a: dict(scores=a["scores"].half()), TypeError, "scores", id="select-scores-fp16"),
    case("pack_kv", lambda a: dict(indices=a["indices"].long()), TypeError, "indices", id="pack-indices-int64"),
    case("pack_kv", lambda a: dict(v=a["v"].half()), TypeError, "v[0]", id="pack-v-vs-k"),
    case("decode_attention", lambda a: dict(lengths=a["lengths"].long()), TypeError, "lengths",
         id="decode-lengths-int64"),
    case("decode_attention", lambda a: dict(q=a["q"].half()), TypeError, "q", id="decode-q-vs-k"),
    case("append_kv", lambda a: dict(v_new=a["v_new"].half()), TypeError, "v_new", id="append-v-new-vs-k-new"),
    case("sparse_decode_attention", lambda a: dict(indices=a["indices"].long()), TypeError, "indices",
         id="sparse-indices-int64"),
    case("sparse_decode_attention", lambda a: dict(n_valid=a["n_valid"].float()), TypeError, "n_valid",
         id="sparse-n-valid-float"),
    case("prune_visual_tokens", lambda a: dict(salience=a["salience"].half()), TypeError, "salience",
         id="prune-salience-fp16"),
]

# ------------------------------------------------------------------------------------------------- wrong rank
RANK_CASES = [
    case("visual_salience", lambda a: dict(q=a["q"][0], k=a["k"][0]), ValueError, "q", id="salience-q-2d"),
    case("visual_salience", lambda a: dict(cu_seqlens=a["cu_seqlens"].view(1, 3)), ValueError, "cu_seqlens",
         id="salience-cu-2d"),
    case("prefill_attention", lambda a: dict(k=a["k"][None]), ValueError, "k", id="prefill-k-4d"),
    case("select_kv", lambda a: dict(scores=a["scores"][0]), ValueError, "scores", id="select-scores-2d"),
    case("pack_kv", lambda a: dict(indices=a["indices"][0, 0]), ValueError, "indices", id="pack-indices-2d"),
    case("pack_kv", lambda a: dict(k=[a["k"][0]], v=[a["v"][0]]), ValueError, "k[0]", id="pack-layer-3d"),
    case("decode_attention", lambda a: dict(k=a["k"][0], v=a["v"][0]), ValueError, "k", id="decode-k-3d"),
    case("decode_attention", lambda a: dict(lengths=a["lengths"][None]), ValueError, "lengths",
         id="decode-lengths-2d"),
    case("append_kv", lambda a: dict(k_new=a["k_new"][0]), ValueError, "k_new", id="append-k-new-2d"),
    case("prune_visual_tokens", lambda a: dict(salience=a["salience"][None]), ValueError, "salience",
         id="prune-salience-2d"),
]

# ------------------------------------------------------------------------------------------- GQA not divisible
GQA_CASES = [
    case("prefill_attention", lambda a: dict(q=torch.randn(6, 3, 8)), ValueError, "q", "k", id="prefill"),
    case("kv_relevance", lambda a: dict(q=torch.randn(6, 3, 8), lse=torch.randn(3, 6)), ValueError, "q", "k",
         id="kv-relevance"),
    case("decode_attention", lambda a: dict(q=torch.randn(2, 3, 8)), ValueError, "q", "k", id="decode"),
    case("sparse_decode_attention", lambda a: dict(q=torch.randn(2, 5, 8)), ValueError, "q", "k_cache",
         id="sparse-decode"),
]

# ---------------------------------------------------------------------------------- last dim not contiguous
STRIDE_CASES = [
    case("visual_salience", lambda a: dict(q=_strided_last(a["q"])), ValueError, "q", id="salience-q"),
    case("visual_salience", lambda a: dict(lse=_strided_last(torch.zeros(2, 12))), ValueError, "lse",
         id="salience-lse"),
    case("prefill_attention", lambda a: dict(v=_strided_last(a["v"])), ValueError, "v", id="prefill-v"),
    case("kv_relevance", lambda a: dict(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "k",
         id="kv-relevance-k"),
    case("select_kv", lambda a: dict(scores=_strided_last(a["scores"])), ValueError, "scores", id="select-scores"),
    case("pack_kv", lambda a: dict(k=[_strided_last(a["k"])], v=[a["v"]]), ValueError, "k[0]", id="pack-k"),
    case("decode_attention", lambda a: dict(k=a["k"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "k", id="decode-k-transposed-wrong-way"),
    case("append_kv", lambda a: dict(v_cache=_strided_last(a["v_cache"])), ValueError, "v_cache", id="append"),
    case("sparse_decode_attention", lambda a: dict(q=_strided_last(a["q"])), ValueError, "q", id="sparse-q"),
]

# ------------------------------------------------------------------------------------------------- cu_seqlens
CU_CASES = [
    case("visual_salience", lambda a: dict(cu_seqlens=_i32([]).view(0)), ValueError, "cu_seqlens", id="empty"),
    case("visual_salience", lambda a: dict(cu_seqlens=_i32([1, 5, 12])), ValueError, "cu_seqlens",
         id="not-starting-at-0"),
    case("visual_salience", lambda a: dict(cu_seqlens=_i32([0, 8, 5, 12])), ValueError, "cu_seqlens",
         id="not-monotone"),
    case("visual_salience", lambda a: dict(cu_seqlens=_i32([0, 5, 11])), ValueError, "cu_seqlens",
         id="last-not-T"),
    case("prefill_attention", lambda a: dict(cu_seqlens_k=_i32([0, 5, 13])), ValueError, "cu_seqlens_k",
         id="prefill-k-last-not-Tk"),
    case("prefill_attention", lambda a: dict(cu_seqlens_q=_i32([0, 4, 2, 6])), ValueError, "cu_seqlens_q",
         id="prefill-q-not-monotone"),
    case("prefill_attention", lambda a: dict(cu_seqlens_q=_i32([0, 6]), max_seqlen_q=6), ValueError,
         "cu_seqlens_q", "cu_seqlens_k", id="prefill-segment-count-mismatch"),
    case("visual_salience", lambda a: dict(cu_seqlens=[0, 5, 12]), TypeError, "cu_seqlens", id="python-list"),
    case("prefill_attention", lambda a: dict(cu_seqlens_k=[0, 5, 12]), TypeError, "cu_seqlens_k",
         id="prefill-python-list"),
]

# ------------------------------------------------------------------------------------------ max_seqlen
MAX_SEQLEN_CASES = [
    case("visual_salience", lambda a: dict(max_seqlen=6), ValueError, "max_seqlen", id="salience-too-small"),
    case("prefill_attention", lambda a: dict(max_seqlen_q=3), ValueError, "max_seqlen_q", id="prefill-q-too-small"),
    case("kv_relevance", lambda a: dict(max_seqlen_k=6), ValueError, "max_seqlen_k", id="kv-relevance-k-too-small"),
    case("visual_salience", lambda a: dict(max_seqlen=torch.tensor(7)), TypeError, "max_seqlen",
         id="salience-tensor"),
    case("visual_salience", lambda a: dict(q=a["q"].view(2, 6, 2, 8), k=a["k"].view(2, 6, 2, 8), cu_seqlens=None,
                                           max_seqlen=torch.tensor(6)), TypeError, "max_seqlen",
         id="salience-batched-tensor"),
    case("prefill_attention", lambda a: dict(max_seqlen_k=torch.tensor(7, dtype=I32)), TypeError, "max_seqlen_k",
         id="prefill-tensor"),
    case("prefill_attention", lambda a: dict(max_seqlen_q=4.0), TypeError, "max_seqlen_q", id="prefill-float"),
    case("visual_salience", lambda a: dict(max_seqlen=None), ValueError, "max_seqlen", id="salience-missing"),
]

# --------------------------------------------------------------------------------------------------- rel_rows
REL_ROWS_CASES = [
    case("prefill_attention", lambda a: dict(rel_rows=_i32([[0, 2, 0], [1, 4, 0]])), ValueError, "rel_rows",
         id="shape-3-cols"),
    case("prefill_attention", lambda a: dict(rel_rows=_i32([[0, 2], [1, 4], [0, 0]])), ValueError, "rel_rows",
         id="shape-S+1-rows"),
    case("prefill_attention", lambda a: dict(rel_rows=_i32([[0, 3], [1, 4]])), ValueError, "rel_rows",
         id="r1-past-segment"),
    case("prefill_attention", lambda a: dict(rel_rows=_i32([[0, 2], [3, 2]])), ValueError, "rel_rows",
         id="r0-after-r1"),
    case("kv_relevance", lambda a: dict(rel_rows=_i32([[-1, 2], [1, 4]])), ValueError, "rel_rows",
         id="kv-relevance-negative"),
    case("kv_relevance", lambda a: dict(rel_rows=None), TypeError, "rel_rows", id="kv-relevance-missing"),
]

# ----------------------------------------------------------------------------------- keep, spans, capacity
SELECT_CASES = [
    case("select_kv", lambda a: dict(keep=11), ValueError, "keep", id="keep-gt-T"),
    case("select_kv", lambda a: dict(keep=-1), ValueError, "keep", id="keep-negative"),
    case("select_kv", lambda a: dict(keep=torch.tensor(3)), TypeError, "keep", id="keep-tensor"),
    case("select_kv", lambda a: dict(vis_end=[8, 11]), ValueError, "vis_end", id="span-end-past-T"),
    case("select_kv", lambda a: dict(vis_start=[9, 0]), ValueError, "vis_start", "vis_end",
         id="span-start-after-end"),
    case("select_kv", lambda a: dict(vis_start=-1), ValueError, "vis_start", id="span-start-negative"),
    case("select_kv", lambda a: dict(vis_start=[1, 0, 0]), ValueError, "vis_start", id="span-count"),
    case("select_kv", lambda a: dict(vis_start=_i32([1, 0])), TypeError, "vis_start", id="span-tensor"),
    case("pack_kv", lambda a: dict(seq_lens=[10, 11]), ValueError, "seq_lens", id="pack-seq-lens-past-T"),
    case("pack_kv", lambda a: dict(seq_lens=[7, 10]), ValueError, "vis_end", "seq_lens",
         id="pack-span-past-seq-len"),
    case("pack_kv", lambda a: dict(capacity=5), ValueError, "capacity", id="capacity-overflow"),
    case("pack_kv", lambda a: dict(capacity=torch.tensor(8)), TypeError, "capacity", id="capacity-tensor"),
    case("pack_kv", lambda a: dict(indices=a["indices"][:, :1]), ValueError, "indices", id="indices-shape"),
    case("pack_kv", lambda a: dict(v=[a["v"], a["v"]]), ValueError, "k", "v", id="layer-count"),
    case("pack_kv", lambda a: dict(k_out=torch.empty(1, 2, 2, 8, 8)), ValueError, "v_out", id="k-out-without-v-out"),
    case("prune_visual_tokens", lambda a: dict(keep_ratio=0.0), ValueError, "keep_ratio", id="prune-ratio-0"),
    case("prune_visual_tokens", lambda a: dict(keep_ratio=1.5), ValueError, "keep_ratio", id="prune-ratio-gt-1"),
    case("prune_visual_tokens", lambda a: dict(seg_lens=[4, 4]), ValueError, "seg_lens", id="prune-seg-sum"),
    case("prune_visual_tokens", lambda a: dict(seg_lens=[6, 6]), ValueError, "group", id="prune-group-divides"),
]

# --------------------------------------------------------------------------------- lengths / n_valid values
LENGTH_CASES = [
    case("decode_attention", lambda a: dict(lengths=_i32([3, 7])), ValueError, "lengths", id="decode-past-cap"),
    case("decode_attention", lambda a: dict(lengths=_i32([-1, 6])), ValueError, "lengths", id="decode-negative"),
    case("decode_attention", lambda a: dict(lengths=_i32([3, 6, 1])), ValueError, "lengths", id="decode-shape"),
    case("append_kv", lambda a: dict(lengths=_i32([3, 6])), ValueError, "lengths", id="append-at-capacity"),
    case("sparse_decode_attention", lambda a: dict(n_valid=_i32([2, 5])), ValueError, "n_valid",
         id="sparse-n-valid-past-n"),
    case("sparse_decode_attention", lambda a: dict(indices=_i32([[[0, 3, 10, 1]] * 2] * 2)), ValueError, "indices",
         id="sparse-index-past-cache"),
    case("append_kv", lambda a: dict(v_new=a["v_new"][:, :1]), ValueError, "v_new", id="append-v-new-shape"),
    case("append_kv", lambda a: dict(k_new=a["k_new"].repeat(1, 2, 1), v_new=a["v_new"].repeat(1, 2, 1)),
         ValueError, "k_new", "k_cache", id="append-heads"),
]

# -------------------------------------------------------------------------------------------------- head dim
HEAD_DIM_CASES = [
    case("visual_salience", lambda a: dict(q=torch.randn(12, 2, 257), k=torch.randn(12, 2, 257)), ValueError, "q",
         id="salience-257"),
    case("prefill_attention", lambda a: dict(q=torch.randn(6, 4, 264), k=torch.randn(12, 2, 264),
                                             v=torch.randn(12, 2, 264)), ValueError, "q", id="prefill-264"),
    case("decode_attention", lambda a: dict(q=torch.randn(2, 4, 272), k=torch.randn(2, 2, 6, 272),
                                            v=torch.randn(2, 2, 6, 272)), ValueError, "q", id="decode-272"),
    case("pack_kv", lambda a: dict(k=torch.randn(2, 2, 10, 257), v=torch.randn(2, 2, 10, 257)), ValueError, "k",
         id="pack-257"),
    case("prefill_attention", lambda a: dict(k=torch.randn(12, 2, 16), v=torch.randn(12, 2, 16)), ValueError, "k",
         id="prefill-k-dim-differs"),
    case("visual_salience", lambda a: dict(k=a["k"][:11]), ValueError, "k", id="salience-k-shape"),
    case("prefill_attention", lambda a: dict(v=a["v"][:11]), ValueError, "v", id="prefill-v-shape"),
]

# ---------------------------------------------------------------------------------- tensors on two devices
DEVICE_CASES = [
    case("visual_salience", lambda a: dict(k=a["k"].to(META)), ValueError, "k", id="salience-k"),
    case("visual_salience", lambda a: dict(lse=torch.zeros(2, 12, device=META)), ValueError, "lse",
         id="salience-lse"),
    case("visual_salience", lambda a: dict(out=torch.empty(12, device=META)), ValueError, "out", id="salience-out"),
    case("prefill_attention", lambda a: dict(v=a["v"].to(META)), ValueError, "v", id="prefill-v"),
    case("prefill_attention", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].to(META)), ValueError, "cu_seqlens_k",
         id="prefill-cu-k"),
    case("prefill_attention", lambda a: dict(rel_rows=a["rel_rows"].to(META)), ValueError, "rel_rows",
         id="prefill-rel-rows"),
    case("kv_relevance", lambda a: dict(lse=a["lse"].to(META)), ValueError, "lse", id="kv-relevance-lse"),
    case("select_kv", lambda a: dict(indices=torch.empty(2, 2, 3, dtype=I32, device=META)), ValueError, "indices",
         id="select-indices-out"),
    case("pack_kv", lambda a: dict(indices=a["indices"].to(META)), ValueError, "indices", id="pack-indices"),
    case("pack_kv", lambda a: dict(k=[a["k"]], v=[a["v"].to(META)]), ValueError, "v[0]", id="pack-v-layer"),
    case("decode_attention", lambda a: dict(v=a["v"].to(META)), ValueError, "v", id="decode-v"),
    case("decode_attention", lambda a: dict(lengths=a["lengths"].to(META)), ValueError, "lengths",
         id="decode-lengths"),
    case("append_kv", lambda a: dict(k_cache=a["k_cache"].to(META)), ValueError, "k_cache", id="append-k-cache"),
    case("sparse_decode_attention", lambda a: dict(indices=a["indices"].to(META)), ValueError, "indices",
         id="sparse-indices"),
]

# ------------------------------------------------------------------------------------------- scale, num_summary
SCALE_CASES = [
    *[case(op, lambda a, s=s: dict(scale=s), ValueError, "scale", id=f"{op}-{s}")
      for op in ("visual_salience", "prefill_attention", "kv_relevance", "decode_attention",
                 "sparse_decode_attention")
      for s in (0.0, -0.125)],
    case("visual_salience", lambda a: dict(scale=float("nan")), ValueError, "scale", id="salience-nan"),
    case("prefill_attention", lambda a: dict(scale=float("inf")), ValueError, "scale", id="prefill-inf"),
    case("decode_attention", lambda a: dict(scale=torch.tensor(0.1)), TypeError, "scale", id="decode-tensor"),
    case("visual_salience", lambda a: dict(num_summary=-1), ValueError, "num_summary", id="num-summary-negative"),
    case("visual_salience", lambda a: dict(num_summary=1.0), TypeError, "num_summary", id="num-summary-float"),
    case("visual_salience", lambda a: dict(q=a["q"].view(2, 6, 2, 8), k=a["k"].view(2, 6, 2, 8)), ValueError,
         "cu_seqlens", id="batched-with-cu-seqlens"),
]

# -------------------------------------------------------------------------------------------- out tensors, lse
OUT_CASES = [
    case("visual_salience", lambda a: dict(out=torch.empty(13)), ValueError, "out", id="salience-out-shape"),
    case("visual_salience", lambda a: dict(out=torch.empty(12), reduce_heads=False), ValueError, "out",
         id="salience-out-per-head-shape"),
    case("visual_salience", lambda a: dict(out=torch.empty(24)[::2]), ValueError, "out",
         id="salience-out-not-contiguous"),
    case("prefill_attention", lambda a: dict(out=torch.empty(6, 4, 9)), ValueError, "out", id="prefill-out-shape"),
    case("prefill_attention", lambda a: dict(lse=torch.empty(6, 4)), ValueError, "lse", id="prefill-lse-shape"),
    case("prefill_attention", lambda a: dict(relevance=torch.empty(4, 12)), ValueError, "relevance",
         id="prefill-relevance-shape"),
    case("kv_relevance", lambda a: dict(relevance=torch.empty(2, 11)), ValueError, "relevance",
         id="kv-relevance-out-shape"),
    case("select_kv", lambda a: dict(indices=torch.empty(2, 2, 4, dtype=I32)), ValueError, "indices",
         id="select-indices-shape"),
    case("pack_kv", lambda a: dict(k_out=torch.empty(1, 2, 2, 9, 8), v_out=torch.empty(1, 2, 2, 8, 8)), ValueError,
         "k_out", id="pack-k-out-shape-5d"),
    case("pack_kv", lambda a: dict(k_out=torch.empty(2, 2, 9, 8), v_out=torch.empty(2, 2, 8, 8)), ValueError,
         "k_out", id="pack-k-out-shape-single-layer"),
    case("pack_kv", lambda a: dict(lengths=torch.empty(3, dtype=I32)), ValueError, "lengths",
         id="pack-lengths-shape"),
    case("decode_attention", lambda a: dict(out=torch.empty(2, 4, 7)), ValueError, "out", id="decode-out-shape"),
    case("decode_attention", lambda a: dict(lse=torch.empty(4, 2)), ValueError, "lse", id="decode-lse-shape"),
    case("sparse_decode_attention", lambda a: dict(out=torch.empty(2, 2, 8)), ValueError, "out",
         id="sparse-out-shape"),
    case("visual_salience", lambda a: dict(out=torch.empty(12, dtype=torch.float16)), TypeError, "out",
         id="salience-out-dtype"),
    case("prefill_attention", lambda a: dict(out=torch.empty(6, 4, 8, dtype=torch.bfloat16)), TypeError, "out",
         id="prefill-out-dtype"),
    case("decode_attention", lambda a: dict(lse=torch.empty(2, 4, dtype=torch.float64)), TypeError, "lse",
         id="decode-lse-dtype"),
    case("select_kv", lambda a: dict(indices=torch.empty(2, 2, 3, dtype=torch.int64)), TypeError, "indices",
         id="select-indices-dtype"),
    case("visual_salience", lambda a: dict(lse=torch.zeros(2, 13)), ValueError, "lse", id="salience-lse-shape"),
    case("visual_salience", lambda a: dict(lse=torch.zeros(12, 2)), ValueError, "lse", id="salience-lse-transposed"),
    case("visual_salience", lambda a: dict(lse=torch.zeros(2, 12, dtype=torch.float16)), TypeError, "lse",
         id="salience-lse-dtype"),
    case("kv_relevance", lambda a: dict(lse=torch.zeros(2, 6)), ValueError, "lse", id="kv-relevance-lse-shape"),
]


@pytest.mark.parametrize("op,change,exc,names", DTYPE_CASES)
def test_wrong_dtype(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", RANK_CASES)
def test_wrong_rank(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", GQA_CASES)
def test_gqa_not_divisible(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", STRIDE_CASES)
def test_last_dim_not_contiguous(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", CU_CASES)
def test_cu_seqlens(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", MAX_SEQLEN_CASES)
def test_max_seqlen(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", REL_ROWS_CASES)
def test_rel_rows(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", SELECT_CASES)
def test_keep_spans_capacity(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", LENGTH_CASES)
def test_lengths_out_of_range(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", HEAD_DIM_CASES)
def test_head_dim_and_shapes(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", DEVICE_CASES)
def test_tensors_on_different_devices(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", SCALE_CASES)
def test_scale_and_num_summary(op, change, exc, names):
    _expect(op, change, exc, *names)


@pytest.mark.parametrize("op,change,exc,names", OUT_CASES)
def test_out_and_lse(op, change, exc, names):
    _expect(op, change, exc, *names)


def test_append_kv_leaves_cache_unchanged_when_full():
    """A rejected append writes nothing: lengths and caches keep their values."""
    args = _append()
    args["lengths"] = _i32([6, 2])
    before = {n: t.clone() for n, t in args.items()}
    with pytest.raises(ValueError, match="lengths"):
        so.append_kv(**args)
    for n, t in args.items():
        assert torch.equal(t, before[n]), f"{n} changed by a rejected append_kv"
