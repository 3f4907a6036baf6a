"""Qwen2.5-VL integration on tiny random models (CPU: reference backend; GPU: the Triton kernels)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import brute  # noqa: E402
from helpers import assert_rel  # noqa: E402
from qwen_tiny import IMG, VEND, VID, VSTART, batch_of_two, tiny_model, visual_inputs  # noqa: E402
from sparsevila_ops import integrations  # noqa: E402
from sparsevila_ops.integrations import attention as attn_mod  # noqa: E402
from sparsevila_ops.integrations.cache import packed_mismatch  # noqa: E402
from sparsevila_ops.integrations import pipeline  # noqa: E402
from sparsevila_ops.integrations import qwen2_5_vl as sv  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cuda" if torch.cuda.is_available() else "cpu")


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kw)


@pytest.fixture
def enabled(model):
    """``enable`` with the given sparsities for one test; always disabled afterwards."""
    def _enable(p, d, **kw):
        return sv.enable(model, p, d, **kw)
    yield _enable
    if getattr(model, "_sparsevila", None) is not None:
        sv.disable(model)


@pytest.mark.parametrize("case", ["image", "video", "batch2"])
def test_zero_sparsity_equals_vanilla(model, enabled, device, case):
    inputs = {"image": lambda: visual_inputs(device=device),
              "video": lambda: visual_inputs(8, 8, 3, 5, seed=3, t=2, video=True, device=device),
              "batch2": lambda: batch_of_two(device)}[case]()
    ref = _generate(model, inputs)
    enabled(0.0, 0.0)
    assert torch.equal(_generate(model, inputs), ref)


def _with_types(inputs: dict) -> dict:
    """``inputs`` plus ``mm_token_type_ids`` (0 text, 1 image, 2 video), as the processor returns them: stock
    ``generate`` then numbers the visual tokens with mRoPE's three rows (``get_rope_index``)."""
    ids = inputs["input_ids"]
    types_ = (ids == IMG).int() + 2 * (ids == VID).int()
    return dict(inputs, mm_token_type_ids=types_)


@pytest.mark.parametrize("case", ["video", "batch2"])
def test_zero_sparsity_with_token_types_equals_vanilla(model, enabled, device, case):
    """With ``mm_token_type_ids`` the unpruned first turn's positions come from ``mrope_positions``, not
    transformers' per-token loop: the same positions reach the LLM and the same tokens come out."""
    inputs = _with_types({"video": lambda: visual_inputs(8, 8, 3, 5, seed=3, t=2, video=True, device=device),
                          "batch2": lambda: batch_of_two(device)}[case]())
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        ref = _generate(model, inputs)
        enabled(0.0, 0.0)
        out = _generate(model, inputs)
    finally:
        h.remove()
    assert torch.equal(out, ref)
    assert torch.equal(seen[NEW], seen[0]) and seen[0].shape[0] == 4  # the prefill's [4, B, L], mRoPE's rows
    assert not torch.equal(seen[0][1], seen[0][0])  # not the text numbering


def _mixed_prompt(device, pads: int = 0, seconds=(0.5, 2.7)) -> dict:
    """One row: text, an image (8 x 12 patches), text, a video (3 x 8 x 8), text, another image (4 x 4), behind
    ``pads`` left pads; ``second_per_grid_ts`` fractional (transformers truncates it with ``int``)."""
    def vis(tok, t, h, w):
        return [VSTART] + [tok] * (t * (h // 2) * (w // 2)) + [VEND]
    ids = [2] * pads + [5, 6] + vis(IMG, 1, 8, 12) + [7, 8, 9] + vis(VID, 3, 8, 8) + [10] + vis(IMG, 1, 4, 4) + [11]
    ids = torch.tensor([ids], device=device)
    mask = torch.ones_like(ids)
    mask[:, :pads] = 0
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=torch.tensor([[1, 8, 12], [1, 4, 4]]),
                video_grid_thw=torch.tensor([[3, 8, 8]]), second_per_grid_ts=torch.tensor(seconds))


@pytest.mark.parametrize("case", ["mixed", "mixed_padded", "no_seconds", "video", "batch2", "text_only"])
def test_mrope_positions_equal_get_rope_index(model, device, case):
    inputs = {"mixed": lambda: _mixed_prompt(device),
              "mixed_padded": lambda: _mixed_prompt(device, pads=3, seconds=(3.0,)),
              "no_seconds": lambda: {k: v for k, v in _mixed_prompt(device).items() if k != "second_per_grid_ts"},
              "video": lambda: visual_inputs(8, 8, 3, 5, seed=3, t=4, video=True, device=device),
              "batch2": lambda: batch_of_two(device),
              "text_only": lambda: dict(input_ids=torch.tensor([[2, 2, 5, 6, 7]], device=device),
                                        attention_mask=torch.tensor([[0, 1, 1, 1, 1]], device=device))}[case]()
    types_ = _with_types(inputs)["mm_token_type_ids"]
    grids = {k: v for k, v in inputs.items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    want, want_deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=types_,
                                                   attention_mask=inputs["attention_mask"], **grids)
    got, deltas = sv.mrope_positions(model, inputs["input_ids"], types_, inputs["attention_mask"], grids)
    assert torch.equal(got, want) and got.dtype == want.dtype
    assert torch.equal(deltas.cpu(), want_deltas.cpu())


def test_mrope_positions_errors(model):
    inputs = _mixed_prompt("cpu")
    types_ = _with_types(inputs)["mm_token_type_ids"]
    grids = dict(image_grid_thw=inputs["image_grid_thw"][:1], video_grid_thw=inputs["video_grid_thw"])
    with pytest.raises(ValueError, match="image_grid_thw has 1 entries but row 0"):
        sv.mrope_positions(model, inputs["input_ids"], types_, inputs["attention_mask"], grids)
    grids = dict(image_grid_thw=torch.tensor([[1, 8, 8], [1, 4, 4]]), video_grid_thw=inputs["video_grid_thw"])
    with pytest.raises(ValueError, match=r"run of 24 tokens of type 1 where image_grid_thw \[1, 8, 8\]"):
        sv.mrope_positions(model, inputs["input_ids"], types_, inputs["attention_mask"], grids)


def test_left_pads_and_visual_spans_match_a_loop(device):
    """The vectorized ``left_pads`` / ``visual_spans`` against the plain per-row definitions."""
    cfg = type("Cfg", (), {"image_token_id": IMG, "video_token_id": VID})
    g = torch.Generator().manual_seed(0)
    for B, L in ((1, 1), (3, 17), (5, 64)):
        pads = torch.randint(0, L + 1, (B,), generator=g).tolist()
        mask = torch.ones(B, L, dtype=torch.long)
        for b, p in enumerate(pads):
            mask[b, :p] = 0
        ids = torch.randint(3, 200, (B, L), generator=g)
        ids[torch.rand(B, L, generator=g) < 0.3] = IMG
        ids[0, :pads[0]] = IMG  # visual ids inside the padding do not count
        assert pipeline.left_pads(mask.to(device)) == pads
        want = []
        for b, p in enumerate(pads):
            pos = torch.nonzero((ids[b, p:] == IMG) | (ids[b, p:] == VID)).flatten().tolist()
            want.append((pos[0], pos[-1] + 1) if pos else (0, 0))
        assert pipeline.visual_spans(ids.to(device), pads, cfg) == want
    assert pipeline.visual_spans(torch.full((2, 4), 5, device=device), [0, 1], cfg) is None
    holes = torch.tensor([[0, 1, 1], [1, 0, 1]], device=device)
    with pytest.raises(ValueError, match="attention_mask row 1 has padding after its first token"):
        pipeline.left_pads(holes)


def _two_turns(model, inputs, device):
    with torch.no_grad():
        r1 = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([r1.sequences, torch.tensor([[5, 6, 7, 8, 9]], device=device)], 1)
        r2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=r1.past_key_values,
                            max_new_tokens=4, do_sample=False)
    return r1, r2


def test_zero_sparsity_two_turns_equal_vanilla(model, enabled, device):
    inputs = visual_inputs(device=device)
    _, ref = _two_turns(model, inputs, device)
    enabled(0.0, 0.0)
    _, out = _two_turns(model, inputs, device)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("sparsity", [(0.0, 0.0), (0.5, 0.9)])
def test_decode_steps_fuse_rope_with_the_append(model, enabled, device, monkeypatch, sparsity):
    """Every decode step rotates q and k and appends in one ``rope_append_kv`` per layer (into the packed cache
    when decode is sparse; never at prefill), with the tokens of the unfused path (the model's rope, then
    ``update``). Both generates run eagerly: a compiled step would keep the fused path its guards saw."""
    from sparsevila_ops.integrations import cache as cache_mod
    calls = []
    real = cache_mod.rope_append_kv
    monkeypatch.setattr(cache_mod, "rope_append_kv", lambda *a, **kw: calls.append(a[5].data_ptr()) or real(*a, **kw))
    enabled(*sparsity)
    inputs = visual_inputs(device=device)
    fused_out = _generate(model, inputs, disable_compile=True)
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == layers * (NEW - 1)
    cache = model._sparsevila._graph_cache  # the generate's cache, kept for reuse
    want = cache.pk[0] if sparsity[1] > 0 else cache.k[0]  # sparse decode appends to the packed cache
    assert calls[0] == want.data_ptr()
    monkeypatch.setattr(cache_mod.SparseVILACache, "decoding", lambda self: False)  # the unfused path
    calls.clear()
    assert torch.equal(_generate(model, inputs, disable_compile=True), fused_out) and not calls


def test_disable_restores_vanilla(model, device):
    inputs = visual_inputs(seed=5, device=device)
    ref = _generate(model, inputs)
    sv.enable(model, 0.5, 0.9)
    sparse = _generate(model, inputs)
    sv.disable(model)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(sparse[:, :n], inputs["input_ids"]) and sparse.shape[1] > n
    assert torch.equal(_generate(model, inputs), ref)
    assert "generate" not in model.__dict__ and "forward" not in model.model.visual.__dict__
    assert model.config.text_config._attn_implementation != attn_mod.ATTN_NAME


def _vanilla_salience_block(model, inputs, block: int):
    """q, k, cu_seqlens of the vanilla vision block ``block`` (window order), captured by a pre-hook."""
    got = {}
    attn = model.model.visual.blocks[block].attn

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        T = x.shape[0]
        q, k, _ = mod.qkv(x).reshape(T, 3, mod.num_heads, -1).unbind(1)
        cos, sin = kwargs["position_embeddings"]
        got["q"], got["k"] = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
        got["cu"], got["scale"] = kwargs["cu_seqlens"], mod.scaling

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        h.remove()
    return got


def test_prefill_keeps_reference_topk_at_vanilla_positions(model, enabled, device):
    inputs = visual_inputs(seed=7, device=device)
    block = model.config.vision_config.fullatt_block_indexes[-1]
    cap = _vanilla_salience_block(model, inputs, block)
    sal = brute.salience(cap["q"].cpu(), cap["k"].cpu(), cap["cu"].cpu(), cap["scale"], 0)
    visual = model.model.visual
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"].cpu(), visual.spatial_merge_size,
                                              visual.window_size, visual.patch_size)
    sal = sal.view(-1, 4)[torch.argsort(window_index)].reshape(-1)  # patch order
    n_patch = int(inputs["image_grid_thw"].prod())
    want = brute.prune(sal.tolist(), [n_patch], 0.25, 4)

    seen = {}
    state = enabled(0.75, 0.0)._sparsevila
    lm = model.model.language_model
    def record(mod, args, kwargs):
        seen.setdefault("pos", kwargs["position_ids"])

    h = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = _generate(model, inputs)
    finally:
        h.remove()
    assert state.last_kept.tolist() == want
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(),
                                              image_grid_thw=inputs["image_grid_thw"])
    vis = torch.nonzero(ids[0] == IMG).flatten()
    keep = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
    keep[vis] = False
    keep[vis[torch.tensor(want, device=ids.device)]] = True
    assert torch.equal(seen["pos"][1:, 0], positions[:, 0, keep])  # the 3 mRoPE rows of the kept tokens
    assert out.shape == (1, ids.shape[1] + NEW) and torch.equal(out[:, :ids.shape[1]], ids)


def _check_packed(cache: integrations.SparseVILACache):
    """Every packed row equals the ordered gather of the full row at prefix + selected + suffix (+ generated)."""
    mismatch = packed_mismatch(cache)
    assert not mismatch, mismatch


def test_decode_packs_selection_and_turn_two_reselects(model, enabled, device, monkeypatch):
    inputs = visual_inputs(seed=9, device=device)
    calls = []
    orig = attn_mod.prefill_attention

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        if kw.get("rel_rows") is not None:
            calls.append((q.detach().clone(), k.detach().clone(), cu_q.clone(), cu_k.clone(), kw["rel_rows"].clone(),
                          kw["scale"]))
        return orig(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(attn_mod, "prefill_attention", spy)
    enabled(0.0, 0.9)
    with torch.no_grad():
        r1 = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = r1.past_key_values
    n_prompt = inputs["input_ids"].shape[1]
    assert cache.sparse and int(cache.seen) == n_prompt + 3 and cache.lengths[:, 0].tolist() == [n_prompt + 3] * 2
    _check_packed(cache)
    first = cache.indices.clone()
    _check_selection(cache, calls[-2:])

    calls.clear()
    ids = torch.cat([r1.sequences, torch.tensor([[5, 6, 7, 8, 9]], device=device)], 1)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                       do_sample=False)
    assert cache.lengths[:, 0].tolist() == [ids.shape[1] + 3] * 2  # the full cache holds both turns
    # turn 2's question rows are all its new tokens: turn 1's last generated token + the 5 question tokens
    assert len(calls) == 2 and calls[0][4].tolist() == [[0, 6]]
    _check_selection(cache, calls)
    _check_packed(cache)
    assert first.shape == cache.indices.shape


def _check_selection(cache, calls):
    """``cache.indices`` are the reference top-k of the float64 relevance of the recorded question rows."""
    vs, ve = cache.vis_spans[0]
    keep = max(1, round(cache.keep_ratio * (ve - vs)))
    for layer, (q, k, cu_q, cu_k, rel_rows, scale) in enumerate(calls):
        lse = brute.prefill(q.cpu(), k.cpu(), k.cpu(), cu_q.cpu(), cu_k.cpu(), scale, True)[1]
        rel = brute.kv_relevance(q.cpu(), k.cpu(), lse, cu_q.cpu(), cu_k.cpu(), scale, True, rel_rows.cpu())
        want = brute.select(rel.view(1, *rel.shape).unsqueeze(0).float(), [vs], [ve], keep)[0]
        assert torch.equal(cache.indices[layer, :1].cpu().long(), want.view(1, *want.shape[1:])), layer


def test_needle_is_kept_at_95_percent(device):
    """A visual token whose key is made to align with the question's queries (RoPE ~ identity) is kept by every
    (layer, kv head) at 95 % decode sparsity."""
    model = tiny_model(seed=3, rope_theta=1e30, device=device)
    inputs = visual_inputs(seed=11, device=device)
    ids = inputs["input_ids"][0]
    vis = torch.nonzero(ids == IMG).flatten()
    needle = int(vis[len(vis) // 2])
    q_rows = slice(int(vis[-1]) + 2, ids.shape[0])  # after <vision_end>
    hooks, saved = [], {}
    for layer in model.model.language_model.layers:
        at = layer.self_attn

        def save_q(mod, args, out, at=at):
            if out.shape[1] > 1:
                saved[at] = out[0, q_rows].view(-1, at.num_heads, at.head_dim)

        def plant_k(mod, args, out, at=at):
            if out.shape[1] == 1:
                return out
            q = saved[at]  # [rows, Hq, D]
            qg = q.view(q.shape[0], at.num_key_value_heads, -1, at.head_dim).mean(dim=(0, 2))  # [Hk, D]
            out = out.clone()
            out[0, needle] = (50.0 * qg / qg.norm(dim=-1, keepdim=True)).reshape(-1)
            return out

        hooks += [at.q_proj.register_forward_hook(save_q), at.k_proj.register_forward_hook(plant_k)]
    try:
        sv.enable(model, 0.0, 0.95)
        with torch.no_grad():
            r = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    finally:
        for h in hooks:
            h.remove()
    cache = r.past_key_values
    assert cache.indices.shape[-1] == max(1, round(0.05 * len(vis)))
    assert (cache.indices == needle).any(dim=-1).all(), cache.indices


def test_errors(model, enabled):
    with pytest.raises(TypeError, match="model must be"):
        sv.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be"):
        integrations.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"prefill_sparsity must be in \[0, 1\)"):
        sv.enable(model, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"decode_sparsity must be in \[0, 1\)"):
        sv.enable(model, 0.5, -0.1)
    with pytest.raises(ValueError, match="salience_layer must be a full-attention vision block"):
        sv.enable(model, 0.5, 0.5, salience_layer=0)
    enabled(0.5, 0.5)
    with pytest.raises(RuntimeError, match="already enabled"):
        sv.enable(model)
    inputs = visual_inputs()
    inputs["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams must be 1"):
        model.generate(**visual_inputs(), max_new_tokens=2, num_beams=2)


@pytest.mark.gpu
def test_decode_step_replays_cuda_graph(device):
    """On CUDA the cache is compileable (``cuda_graph``, the default), so ``generate`` compiles the decode step
    (CUDA graphs); tokens equal the eager decode's."""
    model = tiny_model(device=device, dtype=torch.bfloat16)
    inputs = visual_inputs(device=device, dtype=torch.bfloat16)
    sv.enable(model, 0.5, 0.9, cuda_graph=False)
    eager = _generate(model, inputs)
    sv.disable(model)
    sv.enable(model, 0.5, 0.9, cuda_graph=True)
    graphed = _generate(model, inputs)
    assert hasattr(model, "_compiled_call")
    assert torch.equal(graphed, eager)


def test_compiled_decode_keeps_packed_cache_across_cache_sizes():
    """``cuda_graph=True`` makes the cache compileable, so ``generate`` compiles the decode step (here with
    inductor on the CPU). Compiling one model for two packed-cache sizes in a row made the second compile's
    sizes symbolic, and inductor then wrote the decode appends into the packed cache wrongly (tokens still
    equal); the cache's sizes are marked static so a new size recompiles."""
    from transformers.generation.configuration_utils import CompileConfig

    model = tiny_model()
    cc = CompileConfig(fullgraph=True, mode=None)
    cc._compile_all_devices = True
    for p, d in [(0.0, 0.9), (0.5, 0.9)]:
        sv.enable(model, p, d, cuda_graph=True)
        try:
            with torch.no_grad():
                r = model.generate(**visual_inputs(seed=9), max_new_tokens=6, do_sample=False,
                                   return_dict_in_generate=True, compile_config=cc)
        finally:
            sv.disable(model)
        assert hasattr(model, "_compiled_call")
        _check_packed(r.past_key_values)


def test_pruned_prompt_two_turns(model, enabled, device):
    """With prefill sparsity the cache holds the pruned prompt: turn 2 (the caller's full conversation) drops the
    same visual tokens, continues at the right positions and returns the caller's ids plus the new tokens."""
    inputs = visual_inputs(seed=4, device=device)
    state = enabled(0.5, 0.0)._sparsevila
    r1, r2 = _two_turns(model, inputs, device)
    n_vis = int((inputs["input_ids"] == IMG).sum())
    kept = state.last_kept.numel()
    cache = r1.past_key_values
    n1 = inputs["input_ids"].shape[1] - n_vis + kept  # pruned prompt
    turn2 = r1.sequences.shape[1] + 5
    assert r2.shape[1] == turn2 + 4 and torch.equal(r2[:, :r1.sequences.shape[1]], r1.sequences)
    assert cache.lengths[:, 0].tolist() == [turn2 - (n_vis - kept) + 3] * 2 and n1 + 3 < turn2
    # positions continue from the pruned prompt's last position: rope_deltas = max position + 1 - pruned length
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(),
                                              image_grid_thw=inputs["image_grid_thw"])
    assert int(model.model.rope_deltas[0, 0]) == int(positions.max()) + 1 - n1


class _HostEvent:
    """``torch.Event`` for the CPU (which has none): everything it would wait for has already run."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


@pytest.mark.parametrize("sparsity", [(0.0, 0.0), (0.5, 0.9)])
def test_deferred_stop_check_rolls_back_the_extra_step(model, enabled, device, monkeypatch, sparsity):
    """Under ``deferred_stop_checks`` generate reads the EOS flag one step late and undoes the extra step with
    ``SparseVILACache.crop(-1)``: tokens, cache lengths and a second turn equal the synchronous run's."""
    from sparsevila_ops.integrations import cache as cache_mod

    inputs = visual_inputs(seed=2, device=device)
    enabled(*sparsity)

    def run(eos=None):
        with torch.no_grad():
            r1 = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                eos_token_id=eos, pad_token_id=0)
            ids = torch.cat([r1.sequences, torch.tensor([[5, 6, 7]], device=device)], 1)
            r2 = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                past_key_values=r1.past_key_values, do_sample=False, pad_token_id=0)
        c = r1.past_key_values
        return r1.sequences, r2, int(c.seen), c.lengths.clone(), (c.plengths.clone() if c.sparse else None)

    eos = int(run()[0][0, inputs["input_ids"].shape[1] + 2])  # the third generated token stops the runs below
    sync = run(eos)
    deferred = []
    orig_check = cache_mod.gen_utils.DeferredStopCheck.__call__
    monkeypatch.setattr(torch, "Event", _HostEvent)
    monkeypatch.setattr(cache_mod.gen_utils.DeferredStopCheck, "__call__",
                        lambda self, *a: deferred.append(1) or orig_check(self, *a))
    monkeypatch.setattr(pipeline, "deferred_stop_checks", lambda: cache_mod.deferred_stop_checks(("cuda", "cpu")))
    out = run(eos)
    assert deferred, "the deferred stop check did not run"
    assert sync[0].shape[1] < inputs["input_ids"].shape[1] + 6  # the EOS stop came before max_new_tokens
    for a, b in zip(sync, out):
        assert (a is None and b is None) or (a == b if isinstance(a, int) else torch.equal(a, b))


def test_sparse_cache_crop_refuses_absolute_lengths():
    from sparsevila_ops.integrations.cache import SparseVILACache
    with pytest.raises(NotImplementedError, match="tokens_to_remove <= 0"):
        SparseVILACache(2, 8).crop(3)


def test_cuda_graph_reuses_the_cache_across_calls(model, enabled, device):
    """With ``cuda_graph`` a ``generate`` without a cache reuses (empties) the previous call's buffers, so captured
    graphs replay instead of re-recording; tokens equal a fresh cache's. A cache handed back to the caller
    (``return_dict_in_generate``) is never emptied by a later call; another batch size gets a new cache."""
    inputs = visual_inputs(seed=6, device=device)
    enabled(0.5, 0.9)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    sv.disable(model)
    state = enabled(0.5, 0.9, cuda_graph=True)._sparsevila
    kept, outs = [], []
    for _ in range(2):
        with torch.no_grad():
            outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False, disable_compile=True))
        cache = state._graph_cache
        kept.append((cache, cache.k.data_ptr(), cache.pk.data_ptr()))
    assert kept[0] == kept[1]
    assert all(torch.equal(o, ref) for o in outs)
    _check_packed(kept[1][0])
    with torch.no_grad():
        r = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                           disable_compile=True)
        mine = r.past_key_values
        lengths = mine.lengths.clone()
        model.generate(**inputs, max_new_tokens=2, do_sample=False, disable_compile=True)
    assert mine is kept[0][0] and state._graph_cache is not mine and torch.equal(mine.lengths, lengths)
    assert torch.equal(r.sequences, ref)
    with torch.no_grad():
        model.generate(**batch_of_two(device), max_new_tokens=2, do_sample=False, disable_compile=True)
    assert state._graph_cache.batch_size_ == 2


def test_enable_fuses_projections_into_views(device):
    """``enable`` runs q/k/v and gate/up as one linear each over a concatenated weight whose views are the
    original parameters (state_dict unchanged); a hooked projection keeps its own forward; ``disable`` removes
    the fused forwards."""
    from sparsevila_ops.integrations import fused

    model = tiny_model(seed=1, device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.model.language_model.layers
    hook = layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    sv.enable(model, 0.0, 0.0)
    try:
        attn0 = layers[0].self_attn
        w, b, sizes = attn0.__dict__[fused.QKV]
        assert attn0.k_proj.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert sizes == [attn0.q_proj.out_features, attn0.k_proj.out_features, attn0.v_proj.out_features]
        assert fused.GATE_UP in layers[0].mlp.__dict__ and fused.GATE_UP not in layers[1].mlp.__dict__
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        sv.disable(model)
        hook.remove()
    assert all("forward" not in layer.self_attn.__dict__ and "forward" not in layer.mlp.__dict__
               for layer in layers)


def test_an_mlp_intermediate_is_padded_to_a_multiple_of_64(device):
    """A gated MLP of intermediate size 100 (Qwen2.5-VL's vision blocks: 3420) runs with gate/up blocks and
    down's input padded to 128 with zeros: the same outputs, the original parameters as views (state_dict
    unchanged), re-padding after a replaced down weight, own storage again after ``unfuse``; the vision blocks of
    an enabled model are fused too."""
    from types import SimpleNamespace
    from torch import nn
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
    from sparsevila_ops.integrations import fused

    torch.manual_seed(0)
    block = nn.Module()
    block.mlp = Qwen2_5_VLMLP(SimpleNamespace(hidden_size=48, intermediate_size=100, hidden_act="silu"),
                              bias=True).to(device)
    mlp, x = block.mlp, torch.randn(5, 48, device=device)
    with torch.no_grad():
        want = mlp(x)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    assert fused.fuse([block]) == ["0.mlp"]
    w, b, sizes = mlp.__dict__[fused.GATE_UP]
    wd, _ = mlp.__dict__[fused.DOWN]
    assert sizes == [128, 128] and w.shape == (256, 48) and wd.shape == (48, 128)
    assert torch.count_nonzero(w[100:128]) == 0 and torch.count_nonzero(b[228:]) == 0
    assert torch.count_nonzero(wd[:, 100:]) == 0
    assert mlp.down_proj.weight.untyped_storage().data_ptr() == wd.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
    after = mlp.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    new_down = torch.randn_like(mlp.down_proj.weight)
    mlp.down_proj.weight = nn.Parameter(new_down)  # as load_state_dict(assign=True) does
    fused.fuse([block])
    assert torch.equal(mlp.__dict__[fused.DOWN][0][:, :100], new_down)
    fused.unfuse([block])
    assert fused.DOWN not in mlp.__dict__ and "forward" not in mlp.__dict__
    assert mlp.down_proj.weight.is_contiguous() and torch.equal(mlp.down_proj.weight, new_down)

    model = tiny_model(seed=1, device=device)
    sv.enable(model, 0.0, 0.0)
    try:
        assert all(fused.GATE_UP in blk.mlp.__dict__ for blk in model.model.visual.blocks)
    finally:
        sv.disable(model)
    assert all("forward" not in blk.mlp.__dict__ for blk in model.model.visual.blocks)


def test_4bit_projections_fuse_too(device, monkeypatch):
    """After ``quantize_model_linears`` a gated MLP's gate/up ``W4Linear`` layers run as one 4-bit GEMV (packed
    weights as views of the fused one, state_dict unchanged, the per-module layers' outputs; at decode sizes the
    GEMV's ``glu`` epilogue, bit for bit the unfused SiLU gate times up); a scale changed in
    place is seen (re-fused on the next ``fuse``); ``unfuse`` gives the views their own storage. (q/k/v take the
    same path; the e2e harness test runs a quantized model's generate through it.)"""
    from types import SimpleNamespace
    from torch import nn
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
    from sparsevila_ops.integrations import fused
    from sparsevila_ops.quant import W4Linear, quantize_model_linears

    torch.manual_seed(0)
    block = nn.Module()
    block.mlp = Qwen2_5_VLMLP(SimpleNamespace(hidden_size=128, intermediate_size=256, hidden_act="silu"),
                              bias=False).to(device, torch.bfloat16)
    quantize_model_linears(block)
    mlp, x = block.mlp, torch.randn(3, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = mlp(x)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    assert fused.fuse([block]) == ["0.mlp"]
    fw, _, sizes, _ = mlp.__dict__[fused.GATE_UP]
    assert isinstance(fw, W4Linear) and sizes == [256, 256] and fused.DOWN not in mlp.__dict__
    assert mlp.up_proj.qweight.untyped_storage().data_ptr() == fw.qweight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    glu = []
    monkeypatch.setattr(fw, "glu", lambda x, _f=fw.glu: glu.append(tuple(x.shape)) or _f(x))
    monkeypatch.setattr(fused, "_decode_w4_glu", lambda x: True)  # as on a GPU where its cuda backend runs
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    assert glu == [(3, 128)]
    monkeypatch.undo()
    after = mlp.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        mlp.up_proj.scales.mul_(2)
    fused.fuse([block])
    assert torch.equal(mlp.__dict__[fused.GATE_UP][0].scales[:, 256:], mlp.up_proj.scales)
    fused.unfuse([block])
    assert fused.GATE_UP not in mlp.__dict__ and "forward" not in mlp.__dict__
    assert mlp.up_proj.qweight.untyped_storage().data_ptr() != mlp.gate_proj.qweight.untyped_storage().data_ptr()


def _count_triton_elementwise(monkeypatch, *names: str) -> dict:
    """Force the element-wise Triton path (``triton_elementwise``; on the CPU the kernels run under the interpreter)
    and count the calls of ``triton_kernels.vision``'s ``names``."""
    from sparsevila_ops.integrations import fused
    from sparsevila_ops.integrations import qwen2_5_vl as integ
    from sparsevila_ops.triton_kernels import vision

    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*a, _f=getattr(vision, name), _n=name):
            calls[_n] += 1
            return _f(*a)
        monkeypatch.setattr(vision, name, counted)
    monkeypatch.setattr(integ, "triton_elementwise", lambda *a: True)
    monkeypatch.setattr(fused, "triton_elementwise", lambda *a: True)
    return calls


def test_vision_norms_and_rotary_run_the_triton_kernels(model, enabled, device, monkeypatch):
    """Where Triton runs (forced here, so the CPU suite runs the kernels under the interpreter), every vision
    RMSNorm (all but the first with the residual add before it), each block's rotary embedding and its MLP's SiLU
    gate go through ``triton_kernels/vision.py``; the tower's output matches the stock tower's; ``disable`` restores
    the modules' own forwards."""
    from sparsevila_ops.integrations import qwen2_5_vl as integ

    inputs = visual_inputs(seed=12, device=device)
    visual = model.model.visual
    with torch.no_grad():
        want = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    calls = _count_triton_elementwise(monkeypatch, "rms_norm", "add_rms_norm", "rotary_qk", "silu_mul")
    state = enabled(0.0, 0.0)._sparsevila
    with torch.no_grad():
        got = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    depth = len(visual.blocks)
    # the first norm1 alone; every other norm (norm2s, the next blocks' norm1s, ln_q) with the add before it
    assert calls == {"rms_norm": 1, "add_rms_norm": 2 * depth, "rotary_qk": depth, "silu_mul": depth}
    assert state.pending_norm._entry is None  # the merger's ln_q took the last block's
    # On the GPU the stock tower's patch convolution runs fp32 as TF32 (cuDNN's default); ours is an fp32 matmul
    # and our kernels' fp32 dots are IEEE (test_patch_embed_runs_as_one_linear compares the two without TF32).
    tol = dict(rtol=2e-3, atol=2e-3) if device.type == "cuda" else dict(rtol=1e-4, atol=1e-5)
    for name in ("last_hidden_state", "pooler_output"):  # before / after the merger
        torch.testing.assert_close(got[name], want[name], **tol)
    sv.disable(model)
    assert all("forward" not in n.__dict__ for n in integ._vision_norms(visual))
    assert all("forward" not in b.__dict__ for b in visual.blocks)


def test_window_blocks_run_window_attention_in_half_precision(device, monkeypatch):
    """In bf16 with the Triton path (forced here), each window block's attention (the tiny tower's 12 x 12 image:
    uneven windows) runs as one ``window_attention`` with its rotary embedding, the full-attention blocks rotate
    through ``rotary_qk``; the tower's output matches the stock bf16 tower's."""
    model = tiny_model(dtype=torch.bfloat16, device=device)
    visual = model.model.visual
    inputs = visual_inputs(seed=14, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output.float()
    calls = _count_triton_elementwise(monkeypatch, "window_attention", "rotary_qk")
    sv.enable(model, 0.0, 0.0, cuda_graph=False)
    try:
        with torch.no_grad():
            got = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output.float()
    finally:
        sv.disable(model)
    full = len(model.config.vision_config.fullatt_block_indexes)
    assert calls == {"window_attention": len(visual.blocks) - full, "rotary_qk": full}
    assert_rel(got, want, 2e-2, "tower with window_attention, bf16")


def test_llm_norms_and_rope_run_the_triton_kernels(device, monkeypatch):
    """Where Triton runs (forced here), the decoder's RMSNorms (each layer's two and the final one) and, in half
    precision, each layer's prefill rope go through ``triton_kernels/vision.py`` as the vision tower's do; a bf16
    forward's logits match the stock model's; ``disable`` restores the norms' own forwards."""
    from sparsevila_ops.integrations import fused

    model = tiny_model(dtype=torch.bfloat16, device=device)
    inputs = visual_inputs(seed=13, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(**inputs).logits.float()
    calls = _count_triton_elementwise(monkeypatch, "rms_norm", "add_rms_norm", "rope_qk")
    lm = model.model.language_model
    sv.enable(model, 0.0, 0.0, cuda_graph=False)
    try:
        with torch.no_grad():
            got = model(**inputs).logits.float()
        depth = len(model.model.visual.blocks)  # the tower's first norm alone, its others with their adds
        assert calls == {"rms_norm": 1 + 2 * len(lm.layers) + 1, "add_rms_norm": 2 * depth, "rope_qk": len(lm.layers)}
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    finally:
        sv.disable(model)
    assert all("forward" not in n.__dict__ for n in fused.rms_norms(lm)) and len(fused.rms_norms(lm)) == 5


def test_generate_records_no_autograd_graph(model, enabled, device):
    """``generate`` outside ``torch.no_grad`` (as transformers allows): the pruning's encoder forward must not
    record an autograd graph; the salience kept on the state would hold every vision activation alive (on the
    H200 at 128k visual tokens, ~60 GB per call until the third call ran out of memory)."""
    state = enabled(0.5, 0.9)._sparsevila
    model.generate(**visual_inputs(seed=8, device=device), max_new_tokens=2, do_sample=False)
    assert state.last_salience.grad_fn is None and not state.last_salience.requires_grad


def test_patch_embed_runs_as_one_linear(model, enabled, device):
    """The Conv3d patch embedding (kernel == stride) as ``patches @ W^T`` equals the convolution."""
    pe = model.model.visual.patch_embed
    x = torch.randn(37, pe.in_channels * pe.temporal_patch_size * pe.patch_size ** 2, device=device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuDNN's fp32 conv is TF32 by default
        want = pe(x)
    enabled(0.0, 0.0)
    assert "forward" in pe.__dict__
    torch.testing.assert_close(pe(x), want, rtol=1e-5, atol=1e-5)
    sv.disable(model)
    assert "forward" not in pe.__dict__


def test_reused_cache_follows_inference_mode(model, enabled, device):
    """A cache allocated under ``torch.inference_mode`` holds inference tensors, which cannot be emptied outside
    it: the next ordinary call gets a new cache instead of failing (and so do all later calls)."""
    inputs = visual_inputs(seed=6, device=device)
    enabled(0.5, 0.9, cuda_graph=True)
    with torch.inference_mode():
        a = model.generate(**inputs, max_new_tokens=3, do_sample=False, disable_compile=True)
    b = model.generate(**inputs, max_new_tokens=3, do_sample=False, disable_compile=True)
    with torch.inference_mode():
        c = model.generate(**inputs, max_new_tokens=3, do_sample=False, disable_compile=True)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_deferred_stop_checks_nest_and_restore():
    """Nested (or interleaved, from threads) blocks leave transformers' own check in place after the last."""
    from sparsevila_ops.integrations import cache as cache_mod
    original = cache_mod.gen_utils.DeferredStopCheck.is_supported
    outer = cache_mod.deferred_stop_checks()
    inner = cache_mod.deferred_stop_checks(("cuda", "cpu"))
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # out of order, as two threads may
    patched = cache_mod.gen_utils.DeferredStopCheck.is_supported
    cache = cache_mod.SparseVILACache(1, 4)
    assert patched is not original and patched(torch.device("cpu"), cache, True, False)
    assert patched(torch.device("cpu"), None, False, False) == original(torch.device("cpu"), None, False, False)
    inner.__exit__(None, None, None)
    assert cache_mod.gen_utils.DeferredStopCheck.is_supported is original


def test_fused_projections_follow_replaced_weights_and_autograd(device):
    """The fused weight is a separate tensor: replaced projection weights are re-fused before the next
    ``generate``, a projection that stops being a plain linear is unfused, autograd into trainable weights runs
    the projections themselves, and ``disable`` gives every projection its own storage again."""
    from torch import nn
    from sparsevila_ops.integrations import fused

    model = tiny_model(seed=2, device=device)
    layers = model.model.language_model.layers
    inputs = visual_inputs(seed=3, device=device)
    sv.enable(model, 0.0, 0.0)
    try:
        attn0, mlp0, mlp1 = layers[0].self_attn, layers[0].mlp, layers[1].mlp
        new_q = torch.randn_like(attn0.q_proj.weight)
        attn0.q_proj.weight = nn.Parameter(new_q)  # as load_state_dict(assign=True) does
        mlp1.up_proj = nn.Sequential(mlp1.up_proj)  # no longer a plain linear
        out = _generate(model, inputs)
        assert torch.equal(attn0.__dict__[fused.QKV][0][:new_q.shape[0]], new_q)
        assert fused.GATE_UP not in mlp1.__dict__ and "forward" not in mlp1.__dict__
        x = torch.randn(2, 3, mlp0.gate_proj.in_features, device=device)
        mlp0(x).sum().backward()
        assert mlp0.gate_proj.weight.grad is not None and mlp0.up_proj.weight.grad is not None
    finally:
        sv.disable(model)
    assert torch.equal(_generate(model, inputs), out)
    ptrs = {layers[0].self_attn.__getattr__(n).weight.untyped_storage().data_ptr() for n in ("q_proj", "k_proj")}
    assert len(ptrs) == 2


def test_decode_sized_linears_run_the_gemv_op(device, monkeypatch):
    """At decode sizes an enabled model's fused q/k/v, o, gate/up (emitting silu(gate) * up: glu) and down
    projections run ``sparsevila_ops.gemv`` (on the CPU the reference backend: the cuda-backend condition forced),
    with the model's outputs unchanged within bf16 rounding; prefill-sized inputs keep ``F.linear``; a greedy
    generate gives the tokens of the F.linear path."""
    from sparsevila_ops import linear
    from sparsevila_ops.integrations import fused

    model = tiny_model(seed=3, device=device, dtype=torch.bfloat16)
    layer = model.model.language_model.layers[0]
    sv.enable(model, 0.0, 0.0)
    try:
        x1 = torch.randn(1, 1, layer.mlp.gate_proj.in_features, device=device, dtype=torch.bfloat16)
        x9 = torch.randn(1, 9, layer.mlp.gate_proj.in_features, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            want1, want9 = layer.mlp(x1), layer.mlp(x9)
            ref1 = layer.mlp.down_proj.weight.double() @ (
                torch.nn.functional.silu(layer.mlp.gate_proj(x1)) * layer.mlp.up_proj(x1))[0, 0].double()
        calls = []
        real = linear.gemv
        monkeypatch.setattr(linear, "gemv", lambda x, w, b=None, **kw: calls.append((tuple(x.shape), kw)) or
                            real(x, w, b, **kw))
        monkeypatch.setattr(fused, "_decode_gemv", lambda x, w: x.numel() <= linear.MAX_ROWS * x.shape[-1]
                            and x.dtype == w.dtype == torch.bfloat16)
        with torch.no_grad():
            got1, got9 = layer.mlp(x1), layer.mlp(x9)
        assert calls == [((1, layer.mlp.gate_proj.in_features), {"glu": True}),
                         ((1, layer.mlp.down_proj.in_features), {})]
        assert torch.equal(got9, want9)  # 9 rows: F.linear, as before
        assert (got1[0, 0].double() - ref1).abs().max() <= 2 * (want1[0, 0].double() - ref1).abs().max() + 1e-2
        calls.clear()
        inputs = visual_inputs(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            forced = model.generate(**inputs, max_new_tokens=4, do_sample=False, disable_compile=True)
        assert len(calls) >= 4 * 3 * 2  # qkv, o, gate_up (glu), down per layer and decode step
        monkeypatch.undo()
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, disable_compile=True)
        assert torch.equal(forced, plain)
    finally:
        sv.disable(model)


def test_the_gemv_decision_traces_in_one_graph(monkeypatch):
    """Inside the compiled decode step the device record ``fuse`` made (``_cuda_ready``: a dict hit) and the
    decision on a CPU input trace without a graph break (the cuda loader is never asked while compiling)."""
    from sparsevila_ops.integrations import fused

    cuda0 = torch.device("cuda", 0)
    monkeypatch.setitem(fused._CUDA_READY, ("gemv", cuda0), True)
    w = torch.ones(4, 3, dtype=torch.bfloat16)

    def step(x):
        use = fused._cuda_ready("gemv", cuda0) and not fused._decode_gemv(x, w)
        return x * 2 if use else x

    explained = torch._dynamo.explain(step)(torch.ones(1, 3, dtype=torch.bfloat16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


def test_a_failed_cuda_build_keeps_cublas_for_decode_linears(monkeypatch):
    """The gemv decision asks once per device whether the cuda module builds or loads: a failed build leaves
    ``F.linear`` (cuBLAS) in place, not the portable Triton gemv; a good one enables gemv."""
    from sparsevila_ops import _backend, _cuda
    from sparsevila_ops.integrations import fused

    dev = torch.device("cuda", 5)
    monkeypatch.setattr(_backend, "_unusable", lambda op, backend, device: None)  # as on a Hopper machine

    def broken():
        raise RuntimeError("nvcc failed")
    monkeypatch.setattr(_cuda, "library", broken)
    for op in ("gemv", "w4a16_linear"):
        monkeypatch.delitem(fused._CUDA_READY, (op, dev), raising=False)
        assert fused._cuda_ready(op, dev) is False
    monkeypatch.setattr(_cuda, "library", lambda: object())  # remembered per op and device: not asked again
    assert fused._cuda_ready("gemv", dev) is False
    fused._CUDA_READY.pop(("gemv", dev))
    assert fused._cuda_ready("gemv", dev) is True and fused._cuda_ready("w4a16_linear", dev) is False
    fused._CUDA_READY.pop(("gemv", dev))
    fused._CUDA_READY.pop(("w4a16_linear", dev))
