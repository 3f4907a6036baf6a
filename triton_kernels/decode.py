"""Triton kernels for Op 4: split-KV decode attention, in-place append, and gather-in-kernel sparse decode.

decode_attention (flash-decoding): grid (num_splits, B, Hk). Program (s, b, g) loads the G query heads of KV
head g as one [BLOCK_G >= 16, D] tile and streams its slice of the row's keys once, so each KV head is read
once for its whole query group. Row b's length n_b lives on the device: the slice is
``chunk_b = ceil(n_b / num_splits)`` rounded up to BLOCK_N, split s covers ``[s chunk_b, (s+1) chunk_b) ∩ [0, n_b)``
and programs past n_b exit at once (the grid is static, sized from the capacity). Online softmax in the log2
domain (``qk_scale = scale * log2(e)``), fp32 statistics. Each split writes (o_s / l_s, m_s + log2 l_s) to fp32
scratch (an empty split writes lse_s = -inf); the combine kernel, a program per (b, h, 32 columns), merges:

    lse = log2 sum_s 2^{lse_s},  out = sum_s 2^{lse_s - lse} o_s         (lse returned as ln: * ln 2)

With one split the split kernel writes out/lse directly (no combine launch). n_b == 0 gives out 0, lse -inf.
No host syncs; the scratch is allocated per call, so the launch is CUDA-graph capturable.

On Hopper the kernels use programmatic dependent launch: each is launched with the PDL attribute, waits in
``griddepcontrol.wait`` before touching memory a predecessor may write, then lets its dependent launch, so
the combine (and the next decode or append) is resident before the split grid drains.

sparse_decode_attention is the same kernel with GATHER: key j of row (b, g) is cache position
``indices[b, g, j]`` for ``j < n_valid[b]``.

append_kv: one program per b writes all heads of the new token at slot lengths[b], then bumps lengths[b].

Configs (splits, tiles, warps, stages) come through the autotune seam: ``DECODE``, ``SPARSE_DECODE`` and
``APPEND`` look them up (tuned tables, else ``_decode_default``, ``_sparse_decode_default``, ``_append_default``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._device import sm_count, use_pdl
from ..autotune import Tunable, gpu_name

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, idx_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr, qk_scale,
                         q_sb, q_sh, k_sb, k_sg, k_sn, v_sb, v_sg, v_sn, len_s, i_sb, i_sg, o_sb, o_sh, l_sb, l_sh,
                         G, HQ, D,
                         NUM_SPLITS: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    k_row = k_ptr + b.to(tl.int64) * k_sb + g.to(tl.int64) * k_sg
    v_row = v_ptr + b.to(tl.int64) * v_sb + g.to(tl.int64) * v_sg
    if PDL:  # the previous kernel (e.g. append_kv, or the last layer's combine) may write q, k, v, lengths
        gdc_wait()
        gdc_launch_dependents()  # let the combine launch now; it waits for this grid to finish
    rows = tl.arange(0, BLOCK_G)
    heads = g * G + rows
    mg = rows < G
    md = d < D
    n = tl.load(len_ptr + b * len_s)
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :],  # in flight with n
                mask=mg[:, None] & md[None, :], other=0.0)
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    bh = b.to(tl.int64) * HQ + heads  # scratch: po [B, Hq, NUM_SPLITS, D], pl [B, Hq, NUM_SPLITS], contiguous
    if lo >= n:
        if NUM_SPLITS == 1:  # n == 0: empty softmax
            tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mg[:, None] & md[None, :])
            tl.store(lse_ptr + b.to(tl.int64) * l_sb + heads * l_sh, tl.full([BLOCK_G], float("-inf"), tl.float32),
                     mask=mg)
        else:  # an empty split: weight 0 in the combine
            tl.store(pl_ptr + bh * NUM_SPLITS + split, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=mg)
        return
    hi = tl.minimum(lo + chunk, n)

    i_row = idx_ptr + b.to(tl.int64) * i_sb + g.to(tl.int64) * i_sg

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        mj = j < hi
        if GATHER:
            pos = tl.load(i_row + j, mask=mj, other=0).to(tl.int64)
        else:
            pos = j.to(tl.int64)
        m2 = mj[:, None] & md[None, :]
        kt = tl.load(k_row + pos[:, None] * k_sn + d[None, :], mask=m2, other=0.0)
        vt = tl.load(v_row + pos[:, None] * v_sn + d[None, :], mask=m2, other=0.0)  # both in flight at once
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(mj[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds >= 1 valid key
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    o = acc / l_i[:, None]
    lse2 = m_i + tl.math.log2(l_i)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mg[:, None] & md[None, :])
        tl.store(lse_ptr + b.to(tl.int64) * l_sb + heads * l_sh, lse2 * 0.6931471805599453, mask=mg)
    else:
        tl.store(po_ptr + (bh[:, None] * NUM_SPLITS + split) * D + d[None, :], o, mask=mg[:, None] & md[None, :])
        tl.store(pl_ptr + bh * NUM_SPLITS + split, lse2, mask=mg)


@triton.jit
def _decode_combine_kernel(po_ptr, pl_ptr, out_ptr, lse_ptr, o_sb, o_sh, l_sb, l_sh, HQ, D,
                           NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                           PDL: tl.constexpr):
    """Merge the splits of row (b, h) for BLOCK_D output columns. Empty splits carry lse -inf (weight 0; their
    po is never read), so one round of independent loads suffices: no length load, no dependent chain."""
    bh = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = bh // HQ
    h = bh % HQ
    if PDL:  # launched while the split grid runs: wait for its partials, then let the next kernel launch
        gdc_wait()
        gdc_launch_dependents()
    s = tl.arange(0, BLOCK_S)
    ms = s < NUM_SPLITS
    md = d < D
    pl = tl.load(pl_ptr + bh.to(tl.int64) * NUM_SPLITS + s, mask=ms, other=float("-inf"))
    po = tl.load(po_ptr + (bh.to(tl.int64) * NUM_SPLITS + s[:, None]) * D + d[None, :],
                 mask=ms[:, None] & md[None, :], other=0.0)
    m = tl.max(pl, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: n == 0
    w = tl.math.exp2(pl - m_safe)
    denom = tl.maximum(tl.sum(w, 0), 1e-30)
    o = tl.sum(tl.where(w[:, None] > 0, w[:, None] * po, 0.0), 0) / denom
    tl.store(out_ptr + b.to(tl.int64) * o_sb + h * o_sh + d, o.to(out_ptr.dtype.element_ty), mask=md)
    lse = tl.where(m == float("-inf"), float("-inf"), (m_safe + tl.math.log2(denom)) * 0.6931471805599453)
    tl.store(lse_ptr + b.to(tl.int64) * l_sb + h * l_sh, lse, mask=tl.program_id(1) == 0)


class DecodeKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    G: int
    B: int
    Hk: int
    cap: int  # keys per cache row
    sms: int


# The gather variant's key: DecodeKey with ``n``, the keys a row gathers at most (``indices.shape[2]``), in place of
# ``cap``: the cache's positions do not enter the work.
SparseDecodeKey = NamedTuple("SparseDecodeKey", [("n" if f == "cap" else f, t)
                                                 for f, t in DecodeKey.__annotations__.items()])


def _decode_key(q, k, v, lengths, scale, out, lse) -> tuple:
    B, HQ, D = q.shape
    _, HK, cap, _ = k.shape
    device = q.device
    return (gpu_name(device), q.dtype, D, HQ // max(HK, 1), B, HK, cap, sm_count(device))


def _sparse_decode_key(q, k_cache, v_cache, indices, n_valid, scale, out, lse) -> tuple:
    """The dense key with the gathered keys (``indices.shape[2]``) in place of the cache's positions."""
    gpu, dtype, D, G, B, HK, _, sms = _decode_key(q, k_cache, v_cache, n_valid, scale, out, lse)
    return (gpu, dtype, D, G, B, HK, indices.shape[2], sms)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_g(g: int) -> int:
    """The query rows of one program: the GQA group padded to a power of two >= 16 (the dot's minimum)."""
    return max(16, triton.next_power_of_2(g))


def _split_default(key, keys: int) -> dict:
    """Split-KV heuristic: ~2 programs per SM, each slice >= one tile of BLOCK_N of the row's ``keys``, at most 128
    splits.

    H100 sweep (``python -m bench.decode --sweep``, Qwen2-7B bf16, see bench/NOTES.md): 8 KB K + 8 KB V tiles
    (BLOCK_N 32 at D 128) with 2 warps and 3 stages beat 16 KB tiles with 4 warps by up to 5 % at 8k and tie
    at 32k; more than ~2 programs per SM, or fewer stages, loses (shared memory then caps residency).
    """
    elem, block_d = key.dtype.itemsize, _block_d(key.D)
    block_n = max(16, min(128, 8192 // (block_d * elem)))
    max_splits = max(1, min(128, triton.cdiv(keys, block_n)))
    splits = max(1, min(max_splits, triton.cdiv(2 * key.sms, key.B * key.Hk)))
    return {"NUM_SPLITS": splits, "BLOCK_N": block_n, "num_warps": 2 if block_d <= 128 else 4,
            "num_stages": 3 if elem < 4 else 2, "COMBINE_D": min(block_d, 32)}


def _decode_default(key: DecodeKey) -> dict:
    """Slices down to one tile: on the H200 at 1k keys and at 8k with 2 KV heads, where the bound of 4 tiles per
    slice before left the GPU a quarter full, they were 1.2-1.6x faster (``bench/NOTES.md``)."""
    return _split_default(key, key.cap)


def _sparse_decode_default(key: SparseDecodeKey) -> dict:
    """The dense rule over the ``n`` keys a row gathers (not the cache's positions), then for long slices: tiles of
    twice BLOCK_N from 3 tiles per slice, and ~4 programs per SM from 4. On the H200 (``bench.autotune``'s trials,
    ``bench/NOTES.md``) the gathers' best configs doubled the tile there and, at 300-700 keys per slice, the splits
    (1.2-1.4x)."""
    cfg = _split_default(key, key.n)
    splits, block_n = cfg["NUM_SPLITS"], cfg["BLOCK_N"]
    per_slice = key.n / splits
    if per_slice >= 3 * block_n:
        cfg["BLOCK_N"] = min(128, 2 * block_n)
    if per_slice >= 4 * block_n:
        cfg["NUM_SPLITS"] = max(splits, min(triton.cdiv(key.n, cfg["BLOCK_N"]),
                                            triton.cdiv(4 * key.sms, key.B * key.Hk)))
    return cfg


def _space_around(default, below: bool = False):
    """The sweep of bench/NOTES.md around ``default(key)``: splits x1, x2, x4, x8; BLOCK_N the default's and twice it
    (<= 128); 2 or 4 warps; 1-3 stages. ``below``: also half the splits and half the tile (>= 16)."""
    mults, tiles = ((0.5, 1, 2, 4), (0.5, 1, 2)) if below else ((1, 2, 4, 8), (1, 2))

    def space(key) -> list:
        d = default(key)
        splits = sorted({max(1, int(d["NUM_SPLITS"] * m)) for m in mults})
        blocks = sorted({min(128, max(16, int(d["BLOCK_N"] * t))) for t in tiles})
        return [{**d, "NUM_SPLITS": n, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                for n in splits for bn in blocks for w in (2, 4) for st in (1, 2, 3)]
    return space


def _decode_resources(key, cfg: dict):
    """Shared memory: one K and one V tile per stage. Registers: the fp32 accumulator and scores of the
    BLOCK_G query rows plus the K/V tiles, over the program's threads, + 32."""
    elem, bd, bg, bn = key.dtype.itemsize, _block_d(key.D), _block_g(key.G), cfg["BLOCK_N"]
    smem = cfg["num_stages"] * 2 * bn * bd * elem
    words = bg * bd + bg * bn + (2 * bn * bd + bg * bd) * elem // 4
    return smem, 32 + words // (32 * cfg["num_warps"])


def _launch_decode(q, k, v, lengths, indices, scale, out, lse, cfg) -> None:
    """Split kernel (+ combine when ``cfg["NUM_SPLITS"]`` > 1); ``indices`` not None selects the gather variant."""
    B, HQ, D = q.shape
    HK = k.shape[1]
    if B == 0 or HQ == 0:
        return
    G = HQ // HK
    gather = indices is not None
    S, pdl = cfg["NUM_SPLITS"], use_pdl(q.device)
    if S > 1:
        po = torch.empty(B, HQ, S, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device)
    else:
        po = pl = lse  # unused
    idx = indices if gather else lengths
    launch = {"launch_pdl": True} if pdl else {}
    _decode_split_kernel[(S, B, HK)](
        q, k, v, lengths, idx, out, lse, po, pl, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        lengths.stride(0), idx.stride(0) if gather else 0, idx.stride(1) if gather else 0,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), G, HQ, D,
        NUM_SPLITS=S, GATHER=gather, IEEE=q.dtype == torch.float32, BLOCK_G=_block_g(G),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D), PDL=pdl, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch)
    if S > 1:
        combine_partials(po, pl, out, lse, pdl, cfg["COMBINE_D"])


def combine_partials(po: torch.Tensor, pl: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, pdl: bool,
                     block_d: int = 32) -> None:
    """Merge split partials ``po [B, Hq, S, D]`` (normalised outputs) and ``pl [B, Hq, S]`` (lse, log2) into
    ``out`` and ``lse`` (ln); also used by the cuda backend when a row spans several clusters."""
    B, HQ, S, D = po.shape
    _decode_combine_kernel[(B * HQ, triton.cdiv(D, block_d))](
        po, pl, out, lse, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), HQ, D,
        NUM_SPLITS=S, BLOCK_S=triton.next_power_of_2(S), BLOCK_D=block_d, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))


def _decode(q, k, v, lengths, scale, out, lse, cfg) -> None:
    _launch_decode(q, k, v, lengths, None, scale, out, lse, cfg)


def _sparse_decode(q, k_cache, v_cache, indices, n_valid, scale, out, lse, cfg) -> None:
    _launch_decode(q, k_cache, v_cache, n_valid, indices, scale, out, lse, cfg)


DECODE = Tunable("decode_attention", "triton", key=_decode_key, key_type=DecodeKey, launch=_decode,
                 default=_decode_default, space=_space_around(_decode_default), resources=_decode_resources,
                 buckets=("B", "Hk", "cap"), warmup=Tunable.triton_warmup(_decode))
SPARSE_DECODE = Tunable("sparse_decode_attention", "triton", key=_sparse_decode_key, key_type=SparseDecodeKey,
                        launch=_sparse_decode, default=_sparse_decode_default,
                        space=_space_around(_sparse_decode_default, below=True), resources=_decode_resources,
                        buckets=("B", "Hk", "n"), warmup=Tunable.triton_warmup(_sparse_decode))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                     out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV decode over ``k, v [B, Hk, capacity, D]`` up to ``lengths[b]``; see module doc."""
    DECODE(q, k, v, lengths, scale, out, lse)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor,
                            n_valid: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Split-KV decode over ``k_cache[b, g, indices[b, g, :n_valid[b]]]`` (gather in the kernel)."""
    SPARSE_DECODE(q, k_cache, v_cache, indices, n_valid, scale, out, lse)


@triton.jit
def _append_kv_kernel(kn_ptr, vn_ptr, kc_ptr, vc_ptr, len_ptr,
                      kn_sb, kn_sh, vn_sb, vn_sh, kc_sb, kc_sh, kc_sn, vc_sb, vc_sh, vc_sn, len_s,
                      HK, D, CAP, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n = tl.load(len_ptr + b * len_s)
    ok = n < CAP  # a full cache is left as it is (the public function checks this where it can)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    for h0 in range(0, HK, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        # where, not `& ok`: the interpreter broadcasts a scalar compare as int32, which triton>=3.9 rejects as a mask
        m = tl.where(ok, (h < HK)[:, None] & md[None, :], False)
        kt = tl.load(kn_ptr + b.to(tl.int64) * kn_sb + h[:, None] * kn_sh + d[None, :], mask=m)
        vt = tl.load(vn_ptr + b.to(tl.int64) * vn_sb + h[:, None] * vn_sh + d[None, :], mask=m)
        slot = n.to(tl.int64)
        tl.store(kc_ptr + b.to(tl.int64) * kc_sb + h[:, None].to(tl.int64) * kc_sh + slot * kc_sn + d[None, :],
                 kt, mask=m)
        tl.store(vc_ptr + b.to(tl.int64) * vc_sb + h[:, None].to(tl.int64) * vc_sh + slot * vc_sn + d[None, :],
                 vt, mask=m)
    tl.store(len_ptr + b * len_s, n + 1, mask=ok)


class AppendKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    Hk: int
    B: int


def _append_key(k_new, v_new, k_cache, v_cache, lengths) -> tuple:
    B, HK, D = k_new.shape
    return (gpu_name(k_new.device), k_new.dtype, D, HK, B)


def _heads_per_tile(heads: int, D: int) -> dict:
    """All ``heads`` of the token in one tile of <= 4096 elements, 4 warps."""
    return {"BLOCK_H": max(1, min(triton.next_power_of_2(heads), 4096 // triton.next_power_of_2(D))), "num_warps": 4}


def _append_default(key: AppendKey) -> dict:
    """All K heads of the token in one tile of <= 4096 elements, 4 warps."""
    return _heads_per_tile(key.Hk, key.D)


def _heads_space(heads: int, D: int) -> list:
    """Heads per tile from 1 to all ``heads`` (tiles <= 8192 elements), 1-4 warps."""
    top = min(triton.next_power_of_2(heads), max(1, 8192 // triton.next_power_of_2(D)))
    return [{"BLOCK_H": 1 << i, "num_warps": w} for i in range(top.bit_length()) for w in (1, 2, 4)]


def _append_space(key: AppendKey) -> list:
    return _heads_space(key.Hk, key.D)


def _append_resources(key: AppendKey, cfg: dict):
    """No shared memory; registers: the K and V tiles over the threads, + 32."""
    words = 2 * cfg["BLOCK_H"] * triton.next_power_of_2(key.D) * key.dtype.itemsize // 4
    return 0, 32 + words // (32 * cfg["num_warps"])


def _append(k_new, v_new, k_cache, v_cache, lengths, cfg) -> None:
    B, HK, D = k_new.shape
    if B == 0:
        return
    pdl = use_pdl(k_new.device)
    _append_kv_kernel[(B,)](
        k_new, v_new, k_cache, v_cache, lengths,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), lengths.stride(0),
        HK, D, k_cache.shape[2], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=triton.next_power_of_2(D), PDL=pdl,
        num_warps=cfg["num_warps"], **({"launch_pdl": True} if pdl else {}))


APPEND = Tunable("append_kv", "triton", key=_append_key, key_type=AppendKey, space=_append_space,
                 default=_append_default, launch=_append, warmup=Tunable.triton_warmup(_append),
                 resources=_append_resources, buckets=("B",))


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              lengths: torch.Tensor) -> None:
    """``k_cache[b, :, lengths[b]] = k_new[b]`` (same for v), then ``lengths[b] += 1``; one program per b."""
    APPEND(k_new, v_new, k_cache, v_cache, lengths)


# -- rope_append_kv: a decode step's rotary embedding of q and k, fused with the append -----------------------------
@triton.jit
def _rope_heads(src_ptr, dst_ptr, s_sh, d_sh, d_off, H, c, s, d, partner, md, mask_ok,
                BLOCK_H: tl.constexpr):
    """``dst[h] = src[h] * c + src[h][partner] * s`` for heads ``h < H`` (fp32, one rounding), BLOCK_H at a time;
    ``d_off`` offsets the destination (the cache slot)."""
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = tl.where(mask_ok, (h < H)[:, None] & md[None, :], False)
        row = src_ptr + h[:, None].to(tl.int64) * s_sh
        x = tl.load(row + d[None, :], mask=m).to(tl.float32)
        xp = tl.load(row + partner[None, :], mask=m).to(tl.float32)
        tl.store(dst_ptr + d_off + h[:, None].to(tl.int64) * d_sh + d[None, :],
                 (x * c[None, :] + xp * s[None, :]).to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_append_kv_kernel(q_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, len_ptr, qo_ptr,
                           q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh, cos_sb, sin_sb, kc_sb, kc_sh, kc_sn,
                           vc_sb, vc_sh, vc_sn, len_s, qo_sb, qo_sh,
                           HQ, HK, D, CAP, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n = tl.load(len_ptr + b * len_s)
    ok = n < CAP  # a full cache is left as it is (q is still rotated)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half: [-x[D/2:], x[:D/2]]
    c = tl.load(cos_ptr + b.to(tl.int64) * cos_sb + d, mask=md).to(tl.float32)
    s = tl.load(sin_ptr + b.to(tl.int64) * sin_sb + d, mask=md).to(tl.float32)
    s = tl.where(d < half, -s, s)
    b64 = b.to(tl.int64)
    _rope_heads(q_ptr + b64 * q_sb, qo_ptr + b64 * qo_sb, q_sh, qo_sh, 0, HQ, c, s, d, partner, md, True,
                BLOCK_H)
    slot = n.to(tl.int64)
    _rope_heads(kn_ptr + b64 * kn_sb, kc_ptr + b64 * kc_sb, kn_sh, kc_sh, slot * kc_sn, HK, c, s, d, partner, md, ok,
                BLOCK_H)
    for h0 in range(0, HK, BLOCK_H):  # v unrotated
        h = h0 + tl.arange(0, BLOCK_H)
        m = tl.where(ok, (h < HK)[:, None] & md[None, :], False)
        vt = tl.load(vn_ptr + b64 * vn_sb + h[:, None] * vn_sh + d[None, :], mask=m)
        tl.store(vc_ptr + b64 * vc_sb + h[:, None].to(tl.int64) * vc_sh + slot * vc_sn + d[None, :], vt, mask=m)
    tl.store(len_ptr + b * len_s, n + 1, mask=ok)


class RopeAppendKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    Hq: int
    Hk: int
    B: int


def _rope_append_key(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, q_out) -> tuple:
    B, HQ, D = q.shape
    return (gpu_name(q.device), q.dtype, D, HQ, k_new.shape[1], B)


def _rope_append_default(key: RopeAppendKey) -> dict:
    """All q heads of the token in one tile of <= 4096 elements (the program walks q's heads, then k's, in steps of
    the tile), 4 warps: with GQA the K heads' tile before took Hq / Hk serial steps over q."""
    return _heads_per_tile(max(key.Hq, key.Hk), key.D)


def _rope_append_space(key: RopeAppendKey) -> list:
    return _heads_space(key.Hq, key.D)  # up to all the q heads


def _rope_append_resources(key: RopeAppendKey, cfg: dict):
    """No shared memory; registers: a tile and its partner in fp32 over the threads, + 32."""
    words = 2 * cfg["BLOCK_H"] * triton.next_power_of_2(key.D)
    return 0, 32 + words // (32 * cfg["num_warps"])


def _rope_append(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, q_out, cfg) -> None:
    B, HQ, D = q.shape
    if B == 0:
        return
    pdl = use_pdl(q.device)
    _rope_append_kv_kernel[(B,)](
        q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, q_out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), lengths.stride(0), q_out.stride(0), q_out.stride(1),
        HQ, k_new.shape[1], D, k_cache.shape[2], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=triton.next_power_of_2(D), PDL=pdl,
        num_warps=cfg["num_warps"], **({"launch_pdl": True} if pdl else {}))


ROPE_APPEND = Tunable("rope_append_kv", "triton", key=_rope_append_key, key_type=RopeAppendKey,
                      space=_rope_append_space, default=_rope_append_default, launch=_rope_append,
                      warmup=Tunable.triton_warmup(_rope_append), resources=_rope_append_resources, buckets=("B",))


def rope_append_kv(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, q_out: torch.Tensor) -> None:
    """``q_out = rope(q)``, ``k_cache[b, :, lengths[b]] = rope(k_new[b])`` (v as is), ``lengths[b] += 1``; one
    program per b."""
    ROPE_APPEND(q, k_new, v_new, cos, sin, k_cache, v_cache, lengths, q_out)
