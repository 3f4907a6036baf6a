"""LLaVA-OneVision-7B's SigLIP tower at 128k visual tokens (669 frames of 27 x 27 patches), bf16: transformers'
steps against the integration's. e2e's encoder profile (``bench/NOTES.md``) put 0.93 s of the 2.26 s tower in
``apply_pooling``'s NCHW bilinear kernel and ~0.44 s in adds and copies of a permuted activation layout.

- patch embedding: the convolution vs one GEMM over the gathered patches with K padded 588 -> 592 (16-byte rows;
  unpadded it measured 0.87x the convolution); MLP: transformers' vs the tanh GELU in the fc1 GEMM's epilogue
  (``torch._addmm_activation``: cuBLASLt's GELU_BIAS on CUDA); both as ``enable`` runs them;
- layer: one SigLIP encoder layer (SDPA attention) on the permuted activations transformers' patch embeddings give
  (``flatten(2).transpose(1, 2)``) vs on contiguous ones, and contiguous with the LayerNorms as Triton kernels;
  then the layer with the next layer's LayerNorm, the adds apart vs fused into the LayerNorms (what ``enable``
  runs);
- LayerNorm: ``nn.LayerNorm`` vs ``triton_kernels.vision.layer_norm`` on ``[frames, 729, 1152]`` (bytes floor:
  read and write once);
- salience attention: the salience layer's attention with the LSE, ``prefill_attention`` (one varlen launch) vs
  ``batched_sdpa`` (cuDNN's kernel, which returns it); layer attention: the other layers' SDPA with the backend
  PyTorch picks vs each backend forced;
- pooling: ``LlavaOnevisionModel.apply_pooling`` (an NCHW copy, then the NCHW bilinear kernel) vs the integration's
  ``channels_last_pooling``, on the projector's output ``[frames, 729, 3584]``.

``python -m bench.siglip_tower [--frames N]``. Per row: time per call, per encoder (x the tower's layers for the
layer and the LayerNorm's two per layer), the speedup over stock, a bytes floor where the step moves bytes (input
read once, output written once, at the measured copy bandwidth), and whether the output equals stock's bit for bit
(checked within 1e-2 before timing). The MLP's two variants, and the layer's adds apart vs fused, differ by a few
per cent, less than timings taken one after the other resolve on a GPU whose clock follows its power draw: those
pairs are timed interleaved (``common.time_interleaved``), with the median paired difference in ``paired_diff_ms``.
"""
from __future__ import annotations

import argparse
import functools
import types

import torch

from bench.common import copy_bandwidth_tbps, require_gpu, time_cuda, time_interleaved, verify, write_results

FRAMES = 669  # bench.e2e's 128k LLaVA-OneVision video


def _vision_config():
    from transformers import SiglipVisionConfig
    from sparsevila_ops.integrations.demo import LLAVA_OV_7B
    cfg = SiglipVisionConfig(**{k: v for k, v in LLAVA_OV_7B["vision_config"].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    return cfg


def _row(step, variant, ms, per_encoder, **more):
    return {"step": step, "variant": variant, "median_ms": ms, "per_encoder_ms": per_encoder * ms, **more}


def _patch_embedding(frames, time, device="cuda", cfg=None):
    """The patch embeddings of ``[frames, 3, side, side]`` pixels: the stock convolution vs ``enable``'s GEMM over
    the gathered patches (``vit.patch_embedding_forward``, K zero-padded to a multiple of 8)."""
    from transformers.models.siglip import modeling_siglip as hf
    from sparsevila_ops.integrations import vit
    cfg = cfg or _vision_config()
    emb = hf.SiglipVisionEmbeddings(cfg).to(device, torch.bfloat16).eval()
    pixels = torch.randn(frames, 3, cfg.image_size, cfg.image_size, device=device, dtype=torch.bfloat16)
    conv = emb.patch_embedding
    K, Kp = conv.weight[0].numel(), vit._patch_matrix(conv).shape[1]
    want = emb(pixels)
    stock = time(lambda: emb(pixels))
    conv.forward = types.MethodType(vit.patch_embedding_forward, conv)
    try:
        got = emb(pixels)
        verify(f"patch embedding as a GEMM, K {K} -> {Kp}", got.float(), want.float(), 1e-2)
        ours = time(lambda: emb(pixels))
    finally:
        conv.__dict__.pop("forward")
    return [_row("patch embedding", "convolution (transformers)", stock, 1),
            _row("patch embedding", f"one GEMM, K padded {K} -> {Kp} (enable)", ours, 1, speedup=stock / ours)]


def _mlp_gelu(frames, pair, device="cuda", cfg=None):
    """The MLP ``fc2(gelu_tanh(fc1(x)))``: transformers' three kernels vs the GELU in fc1's GEMM epilogue
    (``vit.gelu_mlp_forward``), timed by ``pair(stock, ours)`` (``common.time_interleaved``'s dict: the two differ
    by a few per cent, less than what separates two timings apart on a GPU whose clock follows its power)."""
    from transformers.models.siglip import modeling_siglip as hf
    from sparsevila_ops.integrations import vit
    cfg = cfg or _vision_config()
    mlp = hf.SiglipMLP(cfg).to(device, torch.bfloat16).eval()
    x = torch.randn(frames * (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, device=device,
                    dtype=torch.bfloat16)
    fused_mlp = lambda: vit.gelu_mlp_forward(mlp, x)  # noqa: E731
    want, got = mlp(x), fused_mlp()
    verify("MLP with the GELU in the GEMM epilogue", got.float(), want.float(), 1e-2)
    t = pair(lambda: mlp(x), fused_mlp)
    stock, ours, layers = t["a_ms"], t["b_ms"], cfg.num_hidden_layers
    return [_row("MLP", "fc1, gelu_pytorch_tanh, fc2 (transformers)", stock, layers),
            _row("MLP", "GELU in fc1's epilogue, _addmm_activation (enable)", ours, layers, speedup=stock / ours,
                 paired_diff_ms=t["diff_ms"])]


def _layer(frames, time, pair, device="cuda", cfg=None):
    """One encoder layer on permuted vs contiguous activations ``[frames, patches, hidden]``, contiguous with the
    LayerNorm kernels, and with the next layer's LayerNorm: the adds apart vs fused into the LayerNorms, timed by
    ``pair(apart, fused)`` (``common.time_interleaved``'s dict: ~1 % of a layer, which timings taken one after
    the other put anywhere between -1 % and +2 %)."""
    from transformers.models.siglip import modeling_siglip as hf
    from sparsevila_ops.integrations import fused, vit
    cfg = cfg or _vision_config()
    layer = hf.SiglipEncoderLayer(cfg).to(device, torch.bfloat16).eval()
    n = (cfg.image_size // cfg.patch_size) ** 2
    permuted = torch.randn(frames, cfg.hidden_size, n, device=device, dtype=torch.bfloat16).transpose(1, 2)
    contiguous = permuted.contiguous()
    want, got = layer(permuted, None), layer(contiguous, None)
    verify("SigLIP layer on contiguous activations", got.float(), want.float(), 1e-2)
    stock, ours = time(lambda: layer(permuted, None)), time(lambda: layer(contiguous, None))
    layers = cfg.num_hidden_layers
    rows = [_row("encoder layer", "permuted activations (transformers)", stock, layers),
            _row("encoder layer", "contiguous activations", ours, layers, speedup=stock / ours,
                 bitwise_equal=torch.equal(got, want))]
    norms = (layer.layer_norm1, layer.layer_norm2)
    for norm in norms:
        norm.forward = types.MethodType(vit.layer_norm_forward, norm)
    try:
        got = layer(contiguous, None)
        verify("SigLIP layer with the LayerNorm kernels", got.float(), want.float(), 1e-2)
        ln = time(lambda: layer(contiguous, None))
        rows.append(_row("encoder layer", "contiguous, LayerNorm kernels", ln, layers, speedup=stock / ln,
                         bitwise_equal=torch.equal(got, want)))
        # With the next layer's layer_norm1 (``nxt``) counted: apart, vs the MLP's add fused into it (and the
        # attention's into layer_norm2), as ``enable`` runs a layer (``vit.encoder_layer_forward``).
        nxt = type(layer.layer_norm1)(cfg.hidden_size, eps=cfg.layer_norm_eps).to(device, torch.bfloat16)
        with torch.no_grad():
            nxt.weight.normal_(1.0, 0.2)
            nxt.bias.normal_(0.0, 0.2)
        # the layer's own forward (its LayerNorms still the kernels), not the fused one installed below
        apart = lambda: vit.layer_norm_forward(nxt, type(layer).forward(layer, contiguous, None))  # noqa: E731
        pending = fused.PendingNorm()
        layer.forward = types.MethodType(functools.partial(vit.encoder_layer_forward, next_norm=nxt,
                                                           pending=pending), layer)

        def fused_adds():
            out = layer(contiguous, None)
            return out, vit.layer_norm_forward(nxt, out, pending)
        out, normed = fused_adds()
        verify("SigLIP layer with the adds in the LayerNorms", out.float(), want.float(), 1e-2)
        verify("the next LayerNorm from the fused add", normed.float(), nxt(want).float(), 1e-2)
        t = pair(apart, fused_adds)
    finally:
        for m in norms + (layer,):
            m.__dict__.pop("forward", None)
    return rows + [_row("encoder layer + next LayerNorm", "LayerNorm kernels, adds apart", t["a_ms"], layers),
                   _row("encoder layer + next LayerNorm", "adds fused into the LayerNorms (enable)", t["b_ms"],
                        layers, speedup=t["a_ms"] / t["b_ms"], paired_diff_ms=t["diff_ms"],
                        bitwise_equal=torch.equal(out, got))]


def _norm_and_activations(frames, n, device, cfg):
    """A LayerNorm of the tower's width with random affine parameters, and ``n`` random bf16 activation tensors
    ``[frames, patches, hidden]``."""
    norm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    shape = (frames, (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)
    return (norm, *(torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(n)))


def _layer_norm(frames, bw, time, device="cuda", cfg=None):
    """``nn.LayerNorm`` vs ``triton_kernels.vision.layer_norm`` on the tower's activations."""
    from sparsevila_ops.integrations import vit
    cfg = cfg or _vision_config()
    norm, x = _norm_and_activations(frames, 1, device, cfg)
    want, got = norm(x), vit.layer_norm_forward(norm, x)
    verify("LayerNorm kernel", got.float(), want.float(), 1e-2)
    stock, ours = time(lambda: norm(x)), time(lambda: vit.layer_norm_forward(norm, x))
    floor = 2 * x.numel() * x.element_size() / bw * 1e3
    per = 2 * cfg.num_hidden_layers
    return [_row("LayerNorm", "nn.LayerNorm (transformers)", stock, per, floor_ms=floor, x_floor=stock / floor),
            _row("LayerNorm", "triton_kernels.vision.layer_norm (enable)", ours, per, floor_ms=floor,
                 x_floor=ours / floor, speedup=stock / ours, bitwise_equal=torch.equal(got, want))]


def _add_layer_norm(frames, bw, time, device="cuda", cfg=None):
    """A residual add and the LayerNorm after it (two per layer): eager's add then ``nn.LayerNorm``, eager's add
    then the LayerNorm kernel, and ``add_layer_norm`` (one kernel; ``enable``'s where the LayerNorms run as
    kernels). Floor: x and r read, the sum and the normalized output written once (4 passes; apart: 5)."""
    from sparsevila_ops.integrations import vit
    cfg = cfg or _vision_config()
    norm, x, r = _norm_and_activations(frames, 2, device, cfg)
    want = norm(x + r)
    floor = 4 * x.numel() * x.element_size() / bw * 1e3
    per = 2 * cfg.num_hidden_layers
    stock, apart = time(lambda: norm(x + r)), time(lambda: vit.layer_norm_forward(norm, x + r))
    rows = [_row("residual add + LayerNorm", "x + r, then nn.LayerNorm (transformers)", stock, per, floor_ms=floor,
                 x_floor=stock / floor),
            _row("residual add + LayerNorm", "x + r, then layer_norm_forward", apart, per, floor_ms=floor,
                 x_floor=apart / floor, speedup=stock / apart)]
    if vit._triton_layer_norm(norm, x):
        s, got = vit._add_layer_norm(x, r, norm)
        verify("add_layer_norm sum", s.float(), (x + r).float(), 0.0)
        verify("add_layer_norm output", got.float(), want.float(), 1e-2)
        ours = time(lambda: vit._add_layer_norm(x, r, norm))
        rows.append(_row("residual add + LayerNorm", "one kernel, add_layer_norm (enable)", ours, per, floor_ms=floor,
                         x_floor=ours / floor, speedup=stock / ours))
    return rows


def _salience_attention(frames, time, device="cuda", cfg=None):
    """The salience layer's attention with the LSE over ``frames`` equal frames: ``prefill_attention`` vs
    ``batched_sdpa`` (cuDNN)."""
    from sparsevila_ops import prefill_attention
    from sparsevila_ops.integrations.attention import batched_sdpa
    cfg = cfg or _vision_config()
    n, H = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_attention_heads
    D = cfg.hidden_size // H
    q, k, v = (torch.randn(frames * n, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.arange(0, frames * n + 1, n, device=device, dtype=torch.int32)
    scale = D ** -0.5
    prefill = lambda: prefill_attention(q, k, v, cu, cu, n, n, scale=scale, causal=False)  # noqa: E731
    sdpa = lambda: batched_sdpa(q, k, v, n, scale, need_lse=True)  # noqa: E731
    (want, want_lse), (got, got_lse) = prefill(), sdpa()
    verify("batched SDPA output", got.float(), want.float(), 1e-2)
    verify("batched SDPA LSE", got_lse, want_lse, 1e-5)
    stock, ours = time(prefill), time(sdpa)
    return [_row("salience attention + LSE", "prefill_attention", stock, 1),
            _row("salience attention + LSE", "batched SDPA, cuDNN (enable)", ours, 1, speedup=stock / ours)]


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")  # torch.nn.attention.SDPBackend


def _layer_attention(frames, time, device="cuda", cfg=None):
    """The other layers' attention core, ``F.scaled_dot_product_attention`` over ``[frames, H, 729, D]`` in the
    layout transformers gives it (``view(B, S, H, D).transpose(1, 2)`` of the projections): the backend PyTorch
    picks vs each one forced (``sdpa_kernel``); a backend that has no kernel for these inputs gets no row (the
    math one would materialize every frame's attention matrix: left out)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = cfg or _vision_config()
    n, H = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_attention_heads
    D = cfg.hidden_size // H
    q, k, v = (torch.randn(frames, n, H, D, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)  # noqa: E731
    want, stock = sdpa(), time(sdpa)
    rows = [_row("layer attention (SDPA)", "default backend (transformers)", stock, cfg.num_hidden_layers)]
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                got = sdpa()
                verify(f"SDPA with {name}", got.float(), want.float(), 1e-2)
                ms = time(sdpa)
        except RuntimeError:  # no kernel of this backend for these inputs here
            continue
        rows.append(_row("layer attention (SDPA)", name.lower(), ms, cfg.num_hidden_layers, speedup=stock / ms))
    return rows


def _pooling(frames, bw, time, device="cuda", side=27, dim=3584):
    """``apply_pooling`` vs ``channels_last_pooling`` on ``[frames, side * side, dim]``."""
    from transformers.models.llava_onevision import modeling_llava_onevision as hf
    from sparsevila_ops.integrations.llava_onevision import channels_last_pooling
    vision = types.SimpleNamespace(image_size=14 * side, patch_size=14)
    owner = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision))
    x = torch.randn(frames, side * side, dim, device=device, dtype=torch.bfloat16)
    want, got = hf.LlavaOnevisionModel.apply_pooling(owner, x), channels_last_pooling(owner, x)
    verify("channels-last pooling", got.float(), want.float(), 1e-2)
    stock = time(lambda: hf.LlavaOnevisionModel.apply_pooling(owner, x))
    ours = time(lambda: channels_last_pooling(owner, x))
    floor = (x.numel() + want.numel()) * x.element_size() / bw * 1e3
    return [_row("video pooling", "apply_pooling (NCHW copy + NCHW bilinear)", stock, 1, floor_ms=floor,
                 x_floor=stock / floor),
            _row("video pooling", "channels_last_pooling (enable)", ours, 1, floor_ms=floor, x_floor=ours / floor,
                 speedup=stock / ours, bitwise_equal=torch.equal(got, want))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=FRAMES, help=f"frames of 27 x 27 patches (default {FRAMES})")
    a = p.parse_args(argv)
    if a.frames < 1:
        p.error(f"--frames must be >= 1; got {a.frames}")
    if not require_gpu("bench.siglip_tower"):
        return 0
    torch.manual_seed(0)
    time = lambda fn: time_cuda(lambda i: fn(), warmup=1, iters=5)["median_ms"]  # noqa: E731
    pair = lambda fa, fb: time_interleaved(lambda i: fa(), lambda i: fb(), 1, 2, 10)  # noqa: E731
    eager_pair = lambda fa, fb: time_interleaved(lambda i: fa(), lambda i: fb(), 1, 2, 10, graph=False)  # noqa: E731
    with torch.no_grad():
        bw = copy_bandwidth_tbps() * 1e12
        rows = (_patch_embedding(a.frames, time) + _layer(a.frames, time, eager_pair)
                + _mlp_gelu(a.frames, pair)
                + _layer_norm(a.frames, bw, time) + _add_layer_norm(a.frames, bw, time)
                + _salience_attention(a.frames, time) + _layer_attention(a.frames, time)
                + _pooling(a.frames, bw, time))
    write_results("siglip_tower", rows, ["step", "variant", "median_ms", "per_encoder_ms", "floor_ms", "x_floor",
                                         "speedup", "paired_diff_ms", "bitwise_equal"],
                  title=f"LLaVA-OneVision-7B SigLIP tower, {a.frames} frames, bf16: transformers' steps vs ours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
