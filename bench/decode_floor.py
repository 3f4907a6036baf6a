"""How far decode is from a plain read of the same bytes, and where the split grid's time goes.

``python -m bench.decode_floor [--layers R]``. Qwen2-7B shapes (28 q / 4 kv heads x 128), bf16, batch 1, contexts
8k / 32k / 128k; every variant runs R layers (distinct caches) in one CUDA graph, like ``bench/decode.py``.

- ``read``: a kernel with the decode's grid and tiles that reads K and V and does the two tile products, but no
  softmax, no length load and no combine (n is an argument), swept over splits / BLOCK_N / warps / stages: the
  best row is the read floor of the harness.
- ``read_ldg`` / ``read_bulk`` (cupy/NVRTC, no Triton): the same bytes read by plain 16-byte loads with many in
  flight per thread, or by TMA bulk copies through a ring of shared-memory slots (one thread issues, one
  mbarrier per slot): a floor that does not depend on Triton's pipelining.
- ``decode``: ``decode_attention`` with the default config and with variants (stages, splits), through
  ``autotune.run_with_config``.
- ``timeline``: %globaltimer stamps of every split program of the default decode for a middle layer: the split
  grid's span (first entry to last exit), the spread of program entries and exits (the tail), and the gap to
  the next layer's first program (the combine and the launch). The stamps come from this file's instrumented
  copy of the production split kernel (``_timed_split_kernel``), followed by the production combine.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bench.common import replay_in_graph, require_gpu, verify, write_results
from bench.decode import D, MODELS, _per_layer_us, _reference, qwen2_caches
from sparsevila_ops import autotune
from sparsevila_ops._device import use_pdl
from sparsevila_ops.triton_kernels.decode import LOG2E, _block_d, _block_g, combine_partials

CONTEXTS = (8192, 32768, 131072)


@triton.jit
def _read_kernel(k_ptr, v_ptr, out_ptr, n, k_sg, v_sg, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr):
    """Program (s, g) reads its slice of K and V row g as the decode does and keeps sum(1 K^T) V alive."""
    s = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = s * chunk
    hi = tl.minimum(lo + chunk, n)
    d = tl.arange(0, D)
    ones = tl.full([16, D], 1.0, tl.float32).to(tl.bfloat16)
    acc = tl.zeros([16, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        m = (j < hi)[:, None]
        kt = tl.load(k_ptr + g.to(tl.int64) * k_sg + j[:, None] * D + d[None, :], mask=m, other=0.0)
        vt = tl.load(v_ptr + g.to(tl.int64) * v_sg + j[:, None] * D + d[None, :], mask=m, other=0.0)
        p = tl.dot(ones, tl.trans(kt))
        acc += tl.dot(p.to(tl.bfloat16), vt)
    tl.store(out_ptr + (g * NUM_SPLITS + s) * 16 * D + tl.arange(0, 16)[:, None] * D + d[None, :], acc)


_CUDA_READ = r"""
#define U {U}
#define NSLOT {NSLOT}
#define SLOT {SLOT}
extern "C" __global__ void read_ldg(const uint4* __restrict__ k, const uint4* __restrict__ v,
                                    long long seg_stride, long long seg_len, int S, unsigned* out) {{
  // grid (S, heads, 2): split s of head y of K (z = 0) or V (z = 1); lengths in 16-byte units
  const uint4* seg = (blockIdx.z ? v : k) + blockIdx.y * seg_stride;
  long long per = (seg_len + S - 1) / S, lo = blockIdx.x * per, hi = min(lo + per, seg_len);
  unsigned acc = 0;
  for (long long i = lo + threadIdx.x; i < hi; i += (long long)blockDim.x * U) {{
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {{
      long long j = i + (long long)u * blockDim.x;
      r[u] = j < hi ? __ldg(seg + j) : make_uint4(0, 0, 0, 0);
    }}
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
  }}
  if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads alive
}}

extern "C" __global__ void read_bulk(const char* k, const char* v, long long seg_stride, long long seg_len,
                                     int S, unsigned* out) {{
  // one thread streams its slice through NSLOT slots of SLOT bytes, one mbarrier each (lengths in bytes)
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long bars[NSLOT];
  if (threadIdx.x != 0) return;
  const char* seg = (blockIdx.z ? v : k) + blockIdx.y * seg_stride;
  long long per = ((seg_len + S - 1) / S + 15) / 16 * 16, lo = blockIdx.x * per, hi = min(lo + per, seg_len);
  if (lo >= hi) return;
  int nchunks = (int)((hi - lo + SLOT - 1) / SLOT);
  unsigned bar0 = (unsigned)__cvta_generic_to_shared(bars), ring0 = (unsigned)__cvta_generic_to_shared(ring);
  for (int i = 0; i < NSLOT; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar0 + 8 * i));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue = [&](int c) {{
    int slot = c % NSLOT;
    unsigned bytes = (unsigned)min((long long)SLOT, hi - lo - (long long)c * SLOT);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar0 + 8 * slot), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(ring0 + slot * SLOT), "l"(seg + lo + (long long)c * SLOT), "r"(bytes), "r"(bar0 + 8 * slot)
                 : "memory");
  }};
  for (int c = 0; c < min(NSLOT, nchunks); ++c) issue(c);
  unsigned acc = 0;
  for (int c = 0; c < nchunks; ++c) {{
    int slot = c % NSLOT;
    asm volatile("{{\n.reg .pred P1;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra D;\nbra W;\nD:\n}}\n" ::"r"(bar0 + 8 * slot), "r"((c / NSLOT) & 1) : "memory");
    acc ^= ring[slot * SLOT];
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    if (c + NSLOT < nchunks) issue(c + NSLOT);
  }}
  if (acc == 0x9e3779b9u) out[0] = acc;
}}
"""


def read_floor_cuda(ctx: int, layers: int, ks, vs) -> list:
    """The read floor without Triton: plain loads (``read_ldg``) and TMA bulk rings (``read_bulk``); needs cupy
    (NVRTC), skipped without it."""
    try:
        import cupy as cp
    except ImportError:
        print("cupy not installed: read_ldg / read_bulk skipped", flush=True)
        return []
    hk, cap = ks[0].shape[1], ks[0].shape[2]
    out = cp.zeros(1, dtype=cp.uint32)
    views = [(cp.asarray(k.view(torch.int16)), cp.asarray(v.view(torch.int16))) for k, v in zip(ks, vs)]
    rows = []
    configs = [("ldg", S, nt, u, 0, 0) for S, nt, u in ((17, 1024, 4), (17, 512, 8), (33, 512, 4), (33, 256, 8),
                                                          (66, 256, 4))]
    configs += [("bulk", S, 32, 0, ns, sl) for S, ns, sl in ((17, 8, 16384), (17, 13, 16384), (17, 26, 8192),
                                                               (33, 6, 16384), (33, 12, 8192), (66, 6, 8192))]
    for kind, S, nt, u, ns, sl in configs:
        mod = cp.RawModule(code=_CUDA_READ.format(U=max(u, 1), NSLOT=max(ns, 1), SLOT=max(sl, 16)),
                           options=("--std=c++17",))
        kern = mod.get_function("read_" + kind)
        smem = ns * sl
        kern.max_dynamic_shared_size_bytes = smem  # with the static barriers this can pass the 48 KB default
        unit = 16 if kind == "ldg" else 1

        def fn(i, kern=kern, S=S, nt=nt, smem=smem, unit=unit):
            with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                kern((S, hk, 2), (nt,), (views[i][0], views[i][1], cp.int64(cap * D * 2 // unit),
                                        cp.int64(ctx * D * 2 // unit), cp.int32(S), out), shared_mem=smem)
        try:
            us = _per_layer_us(fn, layers, iters=30)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"skip {kind} {S}: {type(e).__name__}: {e}"[:300], flush=True)
            continue
        cfg = f"S{S} t{nt} U{u}" if kind == "ldg" else f"S{S} {ns}x{sl // 1024}KB"
        rows.append({"ctx": ctx, "kind": "read_" + kind, "cfg": cfg, "us": us})
        print(rows[-1], flush=True)
    return rows


def read_floor(ctx: int, layers: int, ks, vs) -> list:
    hk = ks[0].shape[1]
    rows = []
    for splits in (33, 66, 99, 132):
        for bn, nw, st in ((32, 2, 3), (32, 2, 4), (32, 4, 4), (64, 4, 3), (64, 4, 4), (32, 2, 6)):
            scratch = torch.empty(hk * splits * 16 * D, dtype=torch.float32, device="cuda")

            def fn(i, splits=splits, bn=bn, nw=nw, st=st, scratch=scratch):
                _read_kernel[(splits, hk)](ks[i], vs[i], scratch, ctx, ks[i].stride(1), vs[i].stride(1),
                                           NUM_SPLITS=splits, BLOCK_N=bn, D=D, num_warps=nw, num_stages=st)
            try:
                us = _per_layer_us(fn, layers, iters=30)
            except Exception as e:  # noqa: BLE001 - a config that cannot compile (shared memory) is skipped
                print(f"skip read {splits} {bn} {nw} {st}: {type(e).__name__}"[:200], flush=True)
                continue
            rows.append({"ctx": ctx, "kind": "read", "cfg": f"S{splits} N{bn} w{nw} s{st}", "us": us})
            print(rows[-1], flush=True)
    return rows


def decode_variants(ctx: int, layers: int, qs, ks, vs, lengths, outs) -> list:
    def args(i):
        return qs[i], ks[i], vs[i], lengths, D ** -0.5, outs[i][0], outs[i][1]

    base = autotune.default_config("decode_attention", *args(0))
    variants = {"default": {}, "stages 4": {"num_stages": 4},
                "splits x1.5": {"NUM_SPLITS": int(base["NUM_SPLITS"] * 1.5)}}
    r0 = _reference(qs[0], ks[0], vs[0], lengths)
    rows = []
    for name, cfg in variants.items():
        def fn(i, cfg=cfg):
            autotune.run_with_config("decode_attention", cfg, *args(i))
        try:
            fn(0)
            verify(f"decode {name}", outs[0][0].float(), r0, 2e-2)
            us = _per_layer_us(fn, layers, iters=30)
        except Exception as e:  # noqa: BLE001
            print(f"skip decode {name}: {type(e).__name__}"[:200], flush=True)
            continue
        rows.append({"ctx": ctx, "kind": "decode", "cfg": name, "us": us})
        print(rows[-1], flush=True)
    return rows


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _timed_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, lse_ptr, po_ptr, pl_ptr, time_ptr, qk_scale,
                        q_sb, q_sh, k_sb, k_sg, k_sn, v_sb, v_sg, v_sn, len_s, o_sb, o_sh, l_sb, l_sh, G, HQ, D,
                        NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """``_decode_split_kernel`` of triton_kernels/decode.py (no gather) with per-program stamps in
    ``time_ptr [B, Hk, NUM_SPLITS, 4]``: %globaltimer at entry, after the PDL wait and at exit (ns), and the SM
    id. Keep it a copy of the production kernel, or its timeline stops describing the kernel that runs."""
    split = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    t_row = time_ptr + ((b * tl.num_programs(2) + g) * NUM_SPLITS + split) * 4
    tl.store(t_row, _globaltimer())
    tl.store(t_row + 3, _smid().to(tl.int64))
    d = tl.arange(0, BLOCK_D)
    k_row = k_ptr + b.to(tl.int64) * k_sb + g.to(tl.int64) * k_sg
    v_row = v_ptr + b.to(tl.int64) * v_sb + g.to(tl.int64) * v_sg
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(t_row + 1, _globaltimer())
    rows = tl.arange(0, BLOCK_G)
    heads = g * G + rows
    mg = rows < G
    md = d < D
    n = tl.load(len_ptr + b * len_s)
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=mg[:, None] & md[None, :], other=0.0)
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    bh = b.to(tl.int64) * HQ + heads
    if lo >= n:
        if NUM_SPLITS == 1:
            tl.store(out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + d[None, :],
                     tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mg[:, None] & md[None, :])
            tl.store(lse_ptr + b.to(tl.int64) * l_sb + heads * l_sh, tl.full([BLOCK_G], float("-inf"), tl.float32),
                     mask=mg)
        else:
            tl.store(pl_ptr + bh * NUM_SPLITS + split, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=mg)
        tl.store(t_row + 2, _globaltimer())
        return
    hi = tl.minimum(lo + chunk, n)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        mj = j < hi
        pos = j.to(tl.int64)
        m2 = mj[:, None] & md[None, :]
        kt = tl.load(k_row + pos[:, None] * k_sn + d[None, :], mask=m2, other=0.0)
        vt = tl.load(v_row + pos[:, None] * v_sn + d[None, :], mask=m2, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(mj[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
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
    tl.store(t_row + 2, _globaltimer())


def decode_with_timeline(q, k, v, lengths, scale, out, lse, stamps, cfg) -> None:
    """``decode_attention`` with config ``cfg`` through the instrumented split kernel, then the production
    combine; ``stamps`` int64 ``[B, Hk, cfg["NUM_SPLITS"], 4]`` receives each split program's stamps."""
    B, HQ, D_ = q.shape
    HK = k.shape[1]
    S = cfg["NUM_SPLITS"]
    pdl = use_pdl(q.device)
    po = torch.empty(B, HQ, S, D_, dtype=torch.float32, device=q.device) if S > 1 else lse
    pl = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device) if S > 1 else lse
    _timed_split_kernel[(S, B, HK)](
        q, k, v, lengths, out, lse, po, pl, stamps, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        lengths.stride(0), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), HQ // HK, HQ, D_,
        NUM_SPLITS=S, IEEE=q.dtype == torch.float32, BLOCK_G=_block_g(HQ // HK),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D_), PDL=pdl, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **({"launch_pdl": True} if pdl else {}))
    if S > 1:
        combine_partials(po, pl, out, lse, pdl, cfg["COMBINE_D"])


def timeline(ctx: int, layers: int, qs, ks, vs, lengths, outs) -> dict:
    """Per-program stamps of the default decode's split grid, layer R/2 of a replayed graph."""
    hk = MODELS["qwen2-7b"][1]
    cfg = autotune.default_config("decode_attention", qs[0], ks[0], vs[0], lengths, D ** -0.5, *outs[0])
    stamps = [torch.zeros(1, hk, cfg["NUM_SPLITS"], 4, dtype=torch.int64, device="cuda") for _ in range(layers)]

    def step():
        for i in range(layers):
            decode_with_timeline(qs[i], ks[i], vs[i], lengths, D ** -0.5, outs[i][0], outs[i][1], stamps[i], cfg)
    replay_in_graph(step)
    mid = layers // 2
    t = stamps[mid].view(-1, 4).cpu().tolist()
    nxt = stamps[mid + 1].view(-1, 4).cpu().tolist()
    entry0 = min(r[0] for r in t)
    waits = sorted(r[1] - entry0 for r in t)
    ends = sorted(r[2] - entry0 for r in t)
    per_sm = {}
    for r in t:
        per_sm[r[3]] = per_sm.get(r[3], 0) + 1
    row = {"ctx": ctx, "kind": "timeline", "programs": len(t), "SMs used": len(per_sm),
           "max programs per SM": max(per_sm.values()),
           "wait released (us) min/med/max": [round(x / 1e3, 2) for x in (waits[0], statistics.median(waits), waits[-1])],
           "exit (us) min/p10/med/p90/max": [round(x / 1e3, 2) for x in (
               ends[0], ends[len(ends) // 10], statistics.median(ends), ends[9 * len(ends) // 10], ends[-1])],
           "next layer first entry (us)": round((min(r[0] for r in nxt) - entry0) / 1e3, 2),
           "next layer wait released (us)": round((min(r[1] for r in nxt) - entry0) / 1e3, 2)}
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28, help="layers (distinct caches) per graph; Qwen2-7B has 28")
    p.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    a = p.parse_args(argv)
    if not require_gpu("bench.decode_floor"):
        return 0
    rows, lines = [], []
    for ctx in a.contexts:
        qs, ks, vs, lengths, outs = qwen2_caches(ctx, a.layers)
        rows += decode_variants(ctx, a.layers, qs, ks, vs, lengths, outs)
        rows += read_floor(ctx, a.layers, ks, vs)
        rows += read_floor_cuda(ctx, a.layers, ks, vs)
        lines.append(timeline(ctx, a.layers, qs, ks, vs, lengths, outs))
        del qs, ks, vs, outs
        torch.cuda.empty_cache()
    for r in rows:
        r["TBps"] = 2 * 4 * r["ctx"] * D * 2 / (r["us"] * 1e-6) / 1e12
    write_results("decode_floor", rows, ["ctx", "kind", "cfg", "us", "TBps"],
                  title=f"decode vs read floor, Qwen2-7B bf16, per layer in a graph of {a.layers} layers")
    print("\n".join(str(x) for x in lines))
    for ctx in a.contexts:
        best = {k: min((r for r in rows if r["ctx"] == ctx and r["kind"] == k), key=lambda r: r["us"], default=None)
                for k in ("read", "read_ldg", "read_bulk", "decode")}
        print(ctx, {k: (v["cfg"], round(v["us"], 2)) for k, v in best.items() if v})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
