"""Triton kernels for Op 3: top-k selection (``select_kv``) and gather-pack of all layers (``pack_kv``).

select_kv: one program per (layer, b, kv-head) row. Scores map to order-preserving int32 keys
(``key = bits`` for x >= 0, ``bits ^ 0x7fffffff`` for x < 0, -0.0 folded into +0.0, so +-inf rank at the ends).
Four radix passes of 8 bits (``tl.histogram`` over the candidates that match the prefix found so far) find
``thr`` = the keep_b-th largest key and ``need`` = how many keys equal to ``thr`` are kept; one ordered pass
then emits, with ``tl.cumsum`` offsets, every position with ``key > thr`` and the first ``need`` positions
with ``key == thr`` (ties to the lower position). Output is sorted by position by construction: no sort.

pack_kv: grid (row, split); each program copies tiles of ``BLOCK_N`` packed slots of one (layer, b, g) row:
slot ``j`` reads cache position ``j`` (prefix), ``indices[j - vs]`` (selected) or ``j - vs - keep_b + ve``
(suffix). Layers are addressed as ``base + l * layer_stride`` when they are views of one stacked tensor
(checked from data_ptrs on the host), else through a device table of per-layer data_ptrs.

Tiles come through the autotune seam: ``SELECT`` and ``PACK`` look them up (tuned tables, else
``_select_default`` / ``_pack_default``).
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import triton
import triton.language as tl

from .._device import sm_count
from ..autotune import Tunable, gpu_name

RADIX_BITS = 8


@triton.jit
def _order_key(x):
    """fp32 -> int32 key with the same (signed) order; -0.0 == +0.0."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _row_span(row, vs_ptr, ve_ptr, B, HK, KEEP):
    """Row ``row`` of the [L, B, Hk] grid as (layer, b, g), batch b's visual span [vs, ve) and its kept count
    ``keep_b = clamp(ve - vs, 0, KEEP)`` (shared by select and pack, which must agree on it)."""
    g = row % HK
    b = (row // HK) % B
    layer = row // (HK * B)
    vs = tl.load(vs_ptr + b)
    ve = tl.load(ve_ptr + b)
    return layer, b, g, vs, ve, tl.maximum(tl.minimum(ve - vs, KEEP), 0)


@triton.jit
def _select_kv_kernel(scores_ptr, vs_ptr, ve_ptr, idx_ptr,
                      s_sl, s_sb, s_sg, i_sl, i_sb, i_sg,
                      B, HK, KEEP,
                      BLOCK: tl.constexpr, BLOCK_KEEP: tl.constexpr):
    layer, b, g, vs, ve, kb = _row_span(tl.program_id(0), vs_ptr, ve_ptr, B, HK, KEEP)
    srow = scores_ptr + layer.to(tl.int64) * s_sl + b.to(tl.int64) * s_sb + g.to(tl.int64) * s_sg
    irow = idx_ptr + layer.to(tl.int64) * i_sl + b.to(tl.int64) * i_sb + g.to(tl.int64) * i_sg

    # Unused tail slots [kb, KEEP) = -1.
    for t in range(kb, KEEP, BLOCK_KEEP):
        offs = t + tl.arange(0, BLOCK_KEEP)
        tl.store(irow + offs, tl.full([BLOCK_KEEP], -1, tl.int32), mask=offs < KEEP)

    if kb > 0:
        bins = tl.arange(0, 256)
        need = kb  # how many keys >= the current prefix bucket are still to be taken
        prefix = 0
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(vs, ve, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < ve
                key = _order_key(tl.load(srow + offs, mask=m, other=0.0))
                if p == 0:
                    digit = ((key >> 24) & 255) ^ 128  # top byte with the sign flipped: unsigned order
                    cand = m
                else:
                    digit = (key >> shift) & 255
                    cand = m & ((key >> (shift + 8)) == prefix)
                hist += tl.histogram(digit, 256, mask=cand)
            total = tl.sum(hist, 0)
            count_ge = total - tl.cumsum(hist, 0) + hist  # candidates with digit >= bin
            dsel = tl.max(tl.where(count_ge >= need, bins, -1), 0)
            need -= tl.sum(tl.where(bins > dsel, hist, 0), 0)
            if p == 0:
                prefix = ((dsel ^ 128) << 24) >> 24  # sign-extended top byte
            else:
                prefix = (prefix << 8) | dsel
        thr = prefix

        # Ordered emission: all keys > thr, then the first `need` keys == thr (lowest positions).
        n_out = 0
        n_eq = 0
        for start in range(vs, ve, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < ve
            key = _order_key(tl.load(srow + offs, mask=m, other=0.0))
            gt = m & (key > thr)
            eq = m & (key == thr)
            eq_i = eq.to(tl.int32)
            eq_rank = n_eq + tl.cumsum(eq_i, 0) - eq_i
            sel = gt | (eq & (eq_rank < need))
            sel_i = sel.to(tl.int32)
            slot = n_out + tl.cumsum(sel_i, 0) - sel_i
            tl.store(irow + slot, offs, mask=sel)
            n_out += tl.sum(sel_i, 0)
            n_eq += tl.sum(eq_i, 0)


class SelectKey(NamedTuple):
    gpu: str
    rows: int  # L * B * Hk
    T: int


def _select_key(scores, vis_start, vis_end, keep, indices) -> tuple:
    L, B, HK, T = scores.shape
    return (gpu_name(scores.device), L * B * HK, T)


def _select_default(key: SelectKey) -> dict:
    """Large chunks for long rows (fewer loop trips), 8 warps from 2048 up. The chunk is the largest power of two
    <= T, not the next one: the loop runs over the visual span only, a few text tokens shorter than T, so a row of
    1024 visual tokens in T = 1152 takes one 1024-chunk per pass, not a 2048-chunk half masked (H200: 1.25-1.9x at
    1024 visual tokens; unchanged from 4096 up)."""
    block = min(4096, max(128, 1 << (max(key.T, 1).bit_length() - 1)))
    return {"BLOCK": block, "BLOCK_KEEP": 1024, "num_warps": 8 if block >= 2048 else 4}


def _select_space(key: SelectKey) -> list:
    """Chunks of 256-4096 scores, 4 or 8 warps."""
    return [{"BLOCK": b, "BLOCK_KEEP": 1024, "num_warps": w} for b in (256, 512, 1024, 2048, 4096) for w in (4, 8)]


def _select_resources(key: SelectKey, cfg: dict):
    """Shared memory: the 256-bin histogram and the scan of a chunk. Registers: a chunk's keys and ranks over the
    threads, + 32."""
    return 4 * (256 + cfg["BLOCK"]), 32 + 4 * cfg["BLOCK"] // (32 * cfg["num_warps"])


def _launch_select(scores, vis_start, vis_end, keep, indices, cfg) -> None:
    L, B, HK, T = scores.shape
    rows = L * B * HK
    if rows == 0 or keep == 0:
        return
    _select_kv_kernel[(rows,)](
        scores, vis_start, vis_end, indices,
        scores.stride(0), scores.stride(1), scores.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        B, HK, keep, **cfg)


SELECT = Tunable("select_kv", "triton", key=_select_key, key_type=SelectKey, space=_select_space,
                 default=_select_default, launch=_launch_select, warmup=Tunable.triton_warmup(_launch_select),
                 resources=_select_resources, buckets=("rows", "T"))


def select_kv(scores: torch.Tensor, vis_start: torch.Tensor, vis_end: torch.Tensor, keep: int,
              indices: torch.Tensor) -> None:
    """Radix top-k of ``scores[l, b, g, vs_b:ve_b]`` for every (layer, b, g) row in one launch; see module doc."""
    SELECT(scores, vis_start, vis_end, keep, indices)


@triton.jit
def _pack_kv_kernel(k_ptr, v_ptr, k_table, v_table, idx_ptr, vs_ptr, ve_ptr, tlen_ptr,
                    ko_ptr, vo_ptr, len_ptr,
                    k_sl, k_sb, k_sg, k_st, v_sl, v_sb, v_sg, v_st,
                    i_sl, i_sb, i_sg, i_sk, o_sl, o_sb, o_sg, o_st,
                    B, HK, KEEP, D,
                    USE_TABLE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    layer, b, g, vs, ve, kb = _row_span(tl.program_id(0), vs_ptr, ve_ptr, B, HK, KEEP)
    tb = tl.load(tlen_ptr + b)
    n = vs + kb + tb - ve
    if (layer == 0) & (g == 0) & (split == 0):
        tl.store(len_ptr + b, n)

    if USE_TABLE:
        k_base = tl.load(k_table + layer).to(tl.pointer_type(k_ptr.dtype.element_ty))
        v_base = tl.load(v_table + layer).to(tl.pointer_type(v_ptr.dtype.element_ty))
    else:
        k_base = k_ptr + layer.to(tl.int64) * k_sl
        v_base = v_ptr + layer.to(tl.int64) * v_sl
    k_row = k_base + b.to(tl.int64) * k_sb + g.to(tl.int64) * k_sg
    v_row = v_base + b.to(tl.int64) * v_sb + g.to(tl.int64) * v_sg
    out_off = layer.to(tl.int64) * o_sl + b.to(tl.int64) * o_sb + g.to(tl.int64) * o_sg
    ko_row = ko_ptr + out_off
    vo_row = vo_ptr + out_off
    i_row = idx_ptr + layer.to(tl.int64) * i_sl + b.to(tl.int64) * i_sb + g.to(tl.int64) * i_sg

    d = tl.arange(0, BLOCK_D)
    md = d < D
    for start in range(split * BLOCK_N, n, NUM_SPLITS * BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        mj = j < n
        in_sel = (j >= vs) & (j < vs + kb)
        sel = tl.load(i_row + (j - vs) * i_sk, mask=mj & in_sel, other=0)
        pos = tl.where(j < vs, j, tl.where(in_sel, sel, j - vs - kb + ve)).to(tl.int64)
        m2 = mj[:, None] & md[None, :]
        o_offs = j.to(tl.int64)[:, None] * o_st + d[None, :]
        kt = tl.load(k_row + pos[:, None] * k_st + d[None, :], mask=m2)
        tl.store(ko_row + o_offs, kt, mask=m2)
        vt = tl.load(v_row + pos[:, None] * v_st + d[None, :], mask=m2)
        tl.store(vo_row + o_offs, vt, mask=m2)


def _layer_addressing(ts: List[torch.Tensor]):
    """(stride in elements between consecutive layers, or None when the layers are not uniformly spaced)."""
    if len(ts) == 1:
        return 0
    elem = ts[0].element_size()
    step = ts[1].data_ptr() - ts[0].data_ptr()
    if step % elem:
        return None
    if any(t.data_ptr() - ts[0].data_ptr() != i * step for i, t in enumerate(ts)):
        return None
    return step // elem


def _pointer_table(ts: List[torch.Tensor], device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64).to(device, non_blocking=True)


class PackKey(NamedTuple):
    gpu: str
    dtype: torch.dtype
    D: int
    rows: int  # (layer, b, g) rows of all layers: L * B * Hk (also when layers launch one by one)
    len: int  # min(T, capacity): the longest packed row
    sms: int


def _same_strides(k: List[torch.Tensor], v: List[torch.Tensor]) -> bool:
    """Whether every layer has layer 0's strides (else the layers are packed one launch each)."""
    ks, vs = k[0].stride(), v[0].stride()
    return all(t.stride() == ks for t in k) and all(t.stride() == vs for t in v)


def _pack_key(k, v, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths) -> tuple:
    """No stride scan here (``_pack`` does the one scan per launch): rows count every layer, bucketed anyway."""
    _, B, HK, cap, D = k_out.shape
    device = k_out.device
    return (gpu_name(device), k_out.dtype, D, len(k) * B * HK, min(k[0].shape[2], cap), sm_count(device))


def _pack_default(key: PackKey) -> dict:
    """Tiles of ~16 KB per tensor (BLOCK_N x D), splits so that ~4 programs per SM stream the rows."""
    block_n = max(16, min(128, 16384 // (triton.next_power_of_2(key.D) * key.dtype.itemsize)))
    tiles = triton.cdiv(max(key.len, 1), block_n)
    splits = max(1, min(tiles, triton.cdiv(4 * key.sms, max(key.rows, 1)), 65535))
    return {"BLOCK_N": block_n, "NUM_SPLITS": splits, "num_warps": 4}


def _pack_space(key: PackKey) -> list:
    """Around the default: half, the same and twice its tiles and splits, 4 or 8 warps."""
    d = _pack_default(key)
    return [{"BLOCK_N": bn, "NUM_SPLITS": sp, "num_warps": w}
            for bn in sorted({max(16, d["BLOCK_N"] // 2), d["BLOCK_N"], min(256, 2 * d["BLOCK_N"])})
            for sp in sorted({max(1, d["NUM_SPLITS"] // 2), d["NUM_SPLITS"], min(65535, 2 * d["NUM_SPLITS"])})
            for w in (4, 8)]


def _pack_resources(key: PackKey, cfg: dict):
    """No shared memory; registers: a K (then V) tile and its positions over the threads, + 32."""
    words = cfg["BLOCK_N"] * (triton.next_power_of_2(key.D) * key.dtype.itemsize // 4 + 2)
    return 0, 32 + words // (32 * cfg["num_warps"])


def _pack(k, v, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths, cfg) -> None:
    """One launch for all layers, or one per layer when their strides differ (not allowed by the op contract,
    but cheap to honour)."""
    if _same_strides(k, v):
        _launch_pack(k, v, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths, cfg)
        return
    for i in range(len(k)):
        _launch_pack([k[i]], [v[i]], indices[i:i + 1], vis_start, vis_end, seq_lens, k_out[i:i + 1],
                     v_out[i:i + 1], lengths, cfg)


def _launch_pack(k, v, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths, cfg) -> None:
    L = len(k)
    _, B, HK, cap, D = k_out.shape
    rows = L * B * HK
    if rows == 0:
        return
    k_ls, v_ls = _layer_addressing(k), _layer_addressing(v)
    use_table = k_ls is None or v_ls is None
    if use_table:
        k_table, v_table = _pointer_table(k, k_out.device), _pointer_table(v, k_out.device)
        k_ls = v_ls = 0
    else:
        k_table = v_table = lengths  # unused (USE_TABLE=False)
    k0, v0 = k[0], v[0]
    _pack_kv_kernel[(rows, cfg["NUM_SPLITS"])](
        k0, v0, k_table, v_table, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths,
        k_ls, k0.stride(0), k0.stride(1), k0.stride(2), v_ls, v0.stride(0), v0.stride(1), v0.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), k_out.stride(3),
        B, HK, indices.shape[-1], D, USE_TABLE=use_table, BLOCK_D=triton.next_power_of_2(D), **cfg)


PACK = Tunable("pack_kv", "triton", key=_pack_key, key_type=PackKey, space=_pack_space, default=_pack_default,
               launch=_pack, warmup=Tunable.triton_warmup(_pack), resources=_pack_resources,
               buckets=("rows", "len"))


def pack_kv(k: List[torch.Tensor], v: List[torch.Tensor], indices: torch.Tensor, vis_start: torch.Tensor,
            vis_end: torch.Tensor, seq_lens: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
            lengths: torch.Tensor) -> None:
    """Gather-pack of every layer of ``k`` and ``v`` in one launch; see module doc."""
    PACK(k, v, indices, vis_start, vis_end, seq_lens, k_out, v_out, lengths)
