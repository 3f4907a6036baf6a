"""LLaVA-OneVision through the SparseVILA pipeline (``integrations/llava_onevision.py``), on a tiny random config on
the CPU: vanilla tokens at sparsities (0, 0), the salience of the SigLIP layer against its eager attention
weights, the pruned prompt against the stock model fed the same embeddings, images kept whole, the checks."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration  # noqa: E402

from sparsevila_ops import integrations  # noqa: E402
from sparsevila_ops.integrations import llava_onevision as ov  # noqa: E402

IMG, VID = 190, 191
SIDE = 4  # patches per frame side (56 px / 14): 16 patches, pooled to 2 x 2


def tiny_model(seed: int = 0, device="cpu", dtype=torch.float32, **over) -> LlavaOnevisionForConditionalGeneration:
    """The demo's tiny config (``integrations.demo.LLAVA_OV_TINY``): 3 SigLIP layers over 56-px frames, a 2-layer
    Qwen2 with GQA 4/2 x 16; ``over`` replaces top-level fields."""
    from sparsevila_ops.integrations.demo import LLAVA_OV_TINY

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(**{**copy.deepcopy(LLAVA_OV_TINY), **over})
    return LlavaOnevisionForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()


def video_inputs(frames: int = 3, seed: int = 0, pre: int = 3, post: int = 5, device="cpu",
                 dtype=torch.float32) -> dict:
    """One prompt: ``pre`` text tokens, the video's pooled tokens and its newline, ``post`` question tokens."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 150, (n,), generator=g).tolist()  # noqa: E731
    ids = text(pre) + [VID] * (frames * 4 + 1) + text(post)
    return dict(input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                pixel_values_videos=torch.randn(1, frames, 3, 14 * SIDE, 14 * SIDE, generator=g).to(device, dtype))


GEN = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)


def _generate(model, inputs, sparsity=None, **kw):
    if sparsity is not None:
        integrations.enable(model, *sparsity, **kw)
    try:
        with torch.no_grad():
            return model.generate(**inputs, **GEN)
    finally:
        if sparsity is not None:
            integrations.disable(model)


def _generate_pruned(model, inputs, sparsity):
    """``generate`` enabled at ``sparsity``: the tokens, and the pooled video tokens kept and their salience."""
    integrations.enable(model, *sparsity)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **GEN)
        return out, model._sparsevila.last_kept, model._sparsevila.last_salience
    finally:
        integrations.disable(model)


def test_sparsities_zero_give_vanilla_tokens_and_disable_restores(device):
    model, inputs = tiny_model(device=device), video_inputs(device=device)
    ref = _generate(model, inputs)
    assert torch.equal(_generate(model, inputs, (0.0, 0.0)), ref)
    assert model._sparsevila is None and "generate" not in model.__dict__
    assert torch.equal(_generate(model, inputs), ref)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_video_features_equal_stock_with_a_contiguous_tower_and_channels_last_pooling(device, dtype):
    """``enable`` makes the SigLIP patch embeddings contiguous and pools on a channels-last view: the video features
    are the stock model's, bit for bit on the CPU; on CUDA within rounding (the LayerNorm kernel sums in another
    order, and cuBLAS picks its kernel by the operands' layout), and ``disable`` removes both."""
    from sparsevila_ops.integrations import vit
    model = tiny_model(device=device, dtype=dtype)
    videos = video_inputs(device=device, dtype=dtype)["pixel_values_videos"]
    embeddings = ov._vision_model(model).embeddings
    with torch.no_grad():
        ref = model.model.get_video_features(videos).pooler_output
        stock_embeddings = embeddings(videos.flatten(0, 1))
        assert not stock_embeddings.is_contiguous()  # transformers' permuted layout
        integrations.enable(model, 0.0, 0.0)
        ours = embeddings(videos.flatten(0, 1))
        assert ours.is_contiguous()
        got = model.model.get_video_features(videos).pooler_output
        integrations.disable(model)
    if device.type == "cuda":
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        for x, want in ((ours, stock_embeddings), (got, ref)):
            assert (x.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    else:
        assert torch.equal(ours, stock_embeddings) and torch.equal(got, ref)
    assert "forward" not in embeddings.__dict__ and "apply_pooling" not in model.model.__dict__
    assert not {"forward", vit.PATCH_WEIGHT} & set(embeddings.patch_embedding.__dict__)
    assert ov._mlps(model) and all("forward" not in m.__dict__ for m in ov._mlps(model))


def test_the_towers_layer_norms_run_the_triton_kernel_where_allowed(monkeypatch, device):
    """Every LayerNorm of the SigLIP tower goes through ``triton_kernels/vision.py`` where ``triton_elementwise``
    allows (forced here: under the interpreter on the CPU): the first layer's ``layer_norm1`` alone, every other
    one of the encoder's and the post-LayerNorm with the residual add before it (``add_layer_norm``); the features
    and the tower's last hidden state match stock's; ``disable`` restores the layers' and norms' own forwards."""
    from sparsevila_ops.integrations import fused
    from sparsevila_ops.triton_kernels import vision

    model = tiny_model(device=device)
    videos = video_inputs(device=device)["pixel_values_videos"]
    calls = {"layer_norm": 0, "add_layer_norm": 0}
    for name in calls:
        def counted(*a, _f=getattr(vision, name), _n=name):
            calls[_n] += 1
            return _f(*a)
        monkeypatch.setattr(vision, name, counted)
    monkeypatch.setattr(fused, "triton_elementwise", lambda *a: True)
    tower = ov._vision_model(model)
    frames = videos.flatten(0, 1).to(tower.embeddings.patch_embedding.weight.dtype)
    with torch.no_grad():
        ref = model.model.get_video_features(videos).pooler_output
        ref_last = tower(frames).last_hidden_state
        state = integrations.enable(model, 0.0, 0.0)._sparsevila
        got = model.model.get_video_features(videos).pooler_output
        n_video = dict(calls)
        got_last = tower(frames).last_hidden_state
        integrations.disable(model)
    layers = len(ov._encoder_layers(model))
    others = len(ov._layer_norms(model)) - (2 * layers + 1)  # beyond the layers' and the post-LayerNorm: a head's
    assert n_video == {"layer_norm": 1 + others, "add_layer_norm": 2 * layers} and state.pending_norm._entry is None
    assert all("forward" not in m.__dict__ for m in ov._layer_norms(model) + list(ov._encoder_layers(model)))
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got_last, ref_last, rtol=2e-3, atol=2e-3)  # after the fused post-LayerNorm


def _gemm_paths(device, monkeypatch):
    """The dtype ``vit.half_gemm`` takes on ``device``: bf16 on CUDA; on the CPU fp32 with the gate forced open."""
    from sparsevila_ops.integrations import vit
    if device.type == "cuda":
        return torch.bfloat16, 2e-2
    monkeypatch.setattr(vit, "half_gemm", lambda *a: True)
    return torch.float32, 1e-5


@pytest.mark.parametrize("side,patch,channels_last", [(60, 14, False), (64, 16, True), (28, 14, False)])
def test_patch_embedding_forward_equals_the_convolution(device, monkeypatch, side, patch, channels_last):
    """``vit.patch_embedding_forward`` against the module's convolution: K = 588 padded to 592 (and 768 not
    padded), a side with pixels past the last whole patch (60 = 4 x 14 + 4), channels-last pixels; its output is
    a view whose ``flatten(2).transpose(1, 2)`` is contiguous; the padded weight follows an in-place change."""
    from sparsevila_ops.integrations import vit
    dtype, tol = _gemm_paths(device, monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 40, kernel_size=patch, stride=patch).to(device, dtype)
    x = torch.randn(3, 3, side, side, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.no_grad():  # recording autograd, the module's own forward runs
            want = conv(x)
            got = vit.patch_embedding_forward(conv, x)
            conv.weight.mul_(-0.5)  # the cached [out, K padded] matrix must follow
        assert got.shape == want.shape and got.flatten(2).transpose(1, 2).is_contiguous()
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    if device.type == "cuda":  # recording autograd: the convolution (the GEMM path has no backward of its own)
        assert vit.patch_embedding_forward(conv, x).grad_fn.name() == "ConvolutionBackward0"
    assert vit._patch_matrix(conv).shape[1] == -(-3 * patch * patch // 8) * 8


def test_gelu_mlp_forward_equals_siglips_mlp(device, monkeypatch):
    """``vit.gelu_mlp_forward`` (the GELU in fc1's GEMM epilogue) against ``SiglipMLP``; on the CPU, where
    ``torch._addmm_activation`` applies the exact GELU, against the MLP with that GELU."""
    from transformers.models.siglip import SiglipVisionConfig
    from transformers.models.siglip import modeling_siglip as siglip
    from sparsevila_ops.integrations import vit
    dtype, tol = _gemm_paths(device, monkeypatch)
    torch.manual_seed(0)
    mlp = siglip.SiglipMLP(SiglipVisionConfig(hidden_size=48, intermediate_size=72)).to(device, dtype)
    x = torch.randn(2, 5, 48, device=device, dtype=dtype)
    with torch.no_grad():
        want = mlp(x) if device.type == "cuda" else mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
        got = vit.gelu_mlp_forward(mlp, x)
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


@pytest.mark.parametrize("side,max_numel", [(4, None), (5, None), (27, None), (5, 2 * 25 * 40 + 1)])
def test_channels_last_pooling_equals_apply_pooling(device, side, max_numel, monkeypatch):
    """``channels_last_pooling`` against transformers' ``apply_pooling`` on odd and even grids (27: LLaVA-OneVision's
    384-px frames, pooled to 14 x 14) of bf16 features; with a small element limit it pools 2 frames per call."""
    if max_numel is not None:
        monkeypatch.setattr(ov, "POOL_MAX_NUMEL", max_numel)
    import types
    from transformers.models.llava_onevision import modeling_llava_onevision as hf
    owner = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=14 * side, patch_size=14)))
    g = torch.Generator().manual_seed(side)
    x = torch.randn(3, side * side, 40, generator=g).to(device, torch.bfloat16)
    got = ov.channels_last_pooling(owner, x)
    assert got.shape == (3, ((side + 1) // 2) ** 2, 40)
    assert torch.equal(got, hf.LlavaOnevisionModel.apply_pooling(owner, x))


def test_salience_is_the_mean_attention_each_patch_receives_pooled_as_the_features():
    """The salience layer's ``visual_salience`` against its eager attention weights: per frame, the mean over heads
    and query rows of softmax(QK^T), pooled bilinearly to 2 x 2 as ``apply_pooling`` pools the features."""
    model, inputs = tiny_model(seed=1), video_inputs(frames=2, seed=1)
    frames = inputs["pixel_values_videos"].flatten(0, 1)
    model.config.vision_config._attn_implementation = "eager"
    with torch.no_grad():
        out = model.model.vision_tower(frames, output_attentions=True)
    layer = len(ov._encoder_layers(model)) - 1  # vision_feature_layer -1: the last layer's output
    want = ov.pool_salience(out.attentions[layer].double().mean(dim=(1, 2)).reshape(-1), 2, SIDE)
    model.config.vision_config._attn_implementation = "sdpa"
    _, kept, got = _generate_pruned(model, inputs, (0.5, 0.0))
    assert got.shape == (2 * 4,) and torch.allclose(got, want, atol=1e-6)
    assert kept.tolist() == sorted(torch.topk(want.float(), 4).indices.tolist())


def test_pruned_prompt_matches_the_stock_model_fed_the_same_embeddings(device):
    """Ours at (0.5, 0): the LLM gets the prompt with each video's most salient half of its pooled tokens and its
    newline, at contiguous positions: the same tokens as the stock model generating from those embeddings."""
    model, inputs = tiny_model(seed=2, device=device), video_inputs(frames=3, seed=2, device=device)
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        feats = torch.cat([feats, model.model.image_newline[None, None]], dim=1).flatten(0, 1)
        embeds = embeds.masked_scatter((ids == VID).unsqueeze(-1), feats)
    ours, kept_pooled, _ = _generate_pruned(model, inputs, (0.5, 0.0))
    kept = torch.zeros(13, dtype=torch.bool, device=device)
    kept[kept_pooled] = True
    kept[-1] = True  # the newline
    keep = torch.ones(ids.shape[1], dtype=torch.bool, device=device)
    keep[ids[0] == VID] = kept
    assert int(kept.sum()) == 6 + 1  # round(0.5 * 12) pooled tokens and the newline
    with torch.no_grad():
        stock = model.generate(inputs_embeds=embeds[:, keep], attention_mask=torch.ones(
            1, int(keep.sum()), dtype=torch.long, device=device), **GEN)
    assert ours.shape == (1, ids.shape[1] + 5) and torch.equal(ours[:, :ids.shape[1]], ids)  # the caller's prompt
    assert torch.equal(ours[:, ids.shape[1]:], stock)


def test_images_are_kept_whole_beside_a_pruned_video():
    model, inputs = tiny_model(seed=3), video_inputs(frames=2, seed=3)
    pix = torch.randn(1, 2, 3, 56, 56)  # anyres: the base image and one 56-px tile
    sizes = torch.tensor([[56, 56]])
    with torch.no_grad():
        n_img = torch.cat(model.model.get_image_features(pix, sizes).pooler_output).shape[0]
    ids = torch.cat([torch.tensor([[4] + [IMG] * n_img]), inputs["input_ids"]], dim=1)
    seen = []
    integrations.enable(model, 0.5, 0.5)
    orig = model.model.language_model.forward
    model.model.language_model.forward = lambda *a, **k: seen.append(k["inputs_embeds"].shape[1]) or orig(*a, **k)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix,
                                 image_sizes=sizes, pixel_values_videos=inputs["pixel_values_videos"], **GEN)
    finally:
        del model.model.language_model.forward
        integrations.disable(model)
    assert seen[0] == ids.shape[1] - 4  # the image's tokens all stay; the video keeps 4 of 8 and its newline
    assert out.shape == (1, ids.shape[1] + 5)
    image_only = torch.tensor([[4] + [IMG] * n_img + [5, 6]])
    out, kept, _ = _generate_pruned(model, dict(input_ids=image_only, pixel_values=pix, image_sizes=sizes), (0.5, 0.5))
    assert kept is None and out.shape == (1, image_only.shape[1] + 5)  # no video: nothing pruned


def test_enable_checks_its_arguments():
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        ov.enable(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        ov.enable(tiny_model(vision_feature_select_strategy="default"))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"salience_layer must be a SigLIP encoder layer in \[0, 3\); got 3"):
        ov.enable(model, salience_layer=3)
    with pytest.raises(ValueError, match="prefill_sparsity must be in"):
        ov.enable(model, 1.0)
    with pytest.raises(ValueError, match="step_graph .* needs cuda_graph=True"):
        ov.enable(model, step_graph=True, cuda_graph=False)
    assert getattr(model, "_sparsevila", None) is None
    assert ov.enable(tiny_model(vision_feature_layer=-2))._sparsevila.salience_layer == 1  # hidden_states[-2]
    assert integrations.enable(model)._sparsevila.salience_layer == 2  # the last layer the projector reads
    with pytest.raises(RuntimeError, match="already enabled"):
        integrations.enable(model)
    integrations.disable(model)


@pytest.mark.gpu
def test_decode_step_replays_cuda_graphs_on_the_gpu():
    """bf16 on CUDA at (0.5, 0.9): the decode step compiled into CUDA graphs (inductor's trees, and the
    integration's own with ``step_graph``) gives the eager decode's tokens."""
    model = tiny_model(device="cuda", dtype=torch.bfloat16)
    inputs = video_inputs(device="cuda", dtype=torch.bfloat16)
    eager = _generate(model, inputs, (0.5, 0.9), cuda_graph=False)
    assert torch.equal(_generate(model, inputs, (0.5, 0.9)), eager)
    torch._dynamo.reset()
    assert torch.equal(_generate(model, inputs, (0.5, 0.9), step_graph=True), eager)


def _two_turns(model, inputs, sparsity=None):
    """A question about the video, then a second question continuing from the returned cache; ours is given the
    video's inputs again, as a chat loop would (the stock model must not be: it would encode them again). The
    random model may not answer with a visual token id."""
    gen = dict(GEN, suppress_tokens=[IMG, VID])
    again = {} if sparsity is None else {"pixel_values_videos": inputs["pixel_values_videos"]}
    if sparsity is not None:
        integrations.enable(model, *sparsity)
    try:
        with torch.no_grad():
            r1 = model.generate(**inputs, **gen, return_dict_in_generate=True)
            ids = torch.cat([r1.sequences, torch.tensor([[40, 41, 42]])], dim=1)
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  past_key_values=r1.past_key_values, **again, **gen)
    finally:
        if sparsity is not None:
            integrations.disable(model)


def test_a_second_turn_continues_from_the_returned_cache():
    """At (0, 0) two turns give the stock model's tokens; pruned, the second turn continues from the cache of the
    pruned first turn and returns the caller's whole prompt."""
    model, inputs = tiny_model(seed=4), video_inputs(seed=4)
    ref = _two_turns(model, inputs)
    assert torch.equal(_two_turns(model, inputs, (0.0, 0.0)), ref)
    out = _two_turns(model, inputs, (0.5, 0.5))
    assert out.shape == ref.shape and torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_a_left_padded_batch_of_two_videos():
    """Two prompts of different lengths, left-padded: vanilla tokens at (0, 0); pruned, each row keeps half of its
    video's pooled tokens and its newline."""
    a, b = video_inputs(frames=2, seed=5, pre=2), video_inputs(frames=2, seed=6, pre=5)
    La, Lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    ids = torch.full((2, Lb), 2)
    mask = torch.zeros(2, Lb, dtype=torch.long)
    ids[0, Lb - La:], mask[0, Lb - La:] = a["input_ids"][0], 1
    ids[1], mask[1] = b["input_ids"][0], 1
    inputs = dict(input_ids=ids, attention_mask=mask,
                  pixel_values_videos=torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]))
    model = tiny_model(seed=5)
    ref = _generate(model, inputs)
    assert torch.equal(_generate(model, inputs, (0.0, 0.0)), ref)
    out, kept, _ = _generate_pruned(model, inputs, (0.5, 0.5))
    assert out.shape == ref.shape and torch.equal(out[:, :Lb], ids)
    assert [int(((kept >= 8 * v) & (kept < 8 * v + 8)).sum()) for v in range(2)] == [4, 4]


def test_demo_runs_llava_onevision_on_the_cpu(tmp_path, capsys):
    """``python -m sparsevila_ops demo --model llava_onevision`` (the tiny config on the CPU): each row's stage
    times, and the pruned row keeps a quarter of the video's 16 pooled tokens."""
    import json

    from sparsevila_ops.demo import main

    path = tmp_path / "ov.json"
    assert main(["--model", "llava_onevision", "--device", "cpu", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["visual_tokens_kept"], r["of"], r["generated"]) for r in rows] == [(16, 16, 8), (16, 16, 8),
                                                                                  (4, 16, 8)]
    assert "LLaVA-OneVision tiny" in capsys.readouterr().out
