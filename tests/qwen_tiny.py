"""Tiny random Qwen2.5-VL models and inputs for the integration tests (no downloads: built from a config)."""
from __future__ import annotations

import copy

import torch

IMG, VID, VSTART, VEND = 151, 152, 153, 154


def tiny_model(seed: int = 0, rope_theta: float = 10000.0, dtype=torch.float32, device="cpu"):
    """The demo's tiny config (``integrations.demo.TINY``): 4 vision blocks (full attention at 1 and 3, windows
    elsewhere), 2 decoder layers with GQA 4/2 x 16; bos/eos/pad 0/1/2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from sparsevila_ops.integrations.demo import TINY

    cfg = copy.deepcopy(TINY)
    cfg["text_config"]["rope_parameters"]["rope_theta"] = rope_theta
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).to(device=device, dtype=dtype).eval()


def visual_inputs(h: int = 12, w: int = 12, pre: int = 3, post: int = 6, seed: int = 0, t: int = 1,
                  video: bool = False, device="cpu", dtype=torch.float32) -> dict:
    """One prompt: ``pre`` text tokens, <vision_start>, the image's (or video's) merged tokens, <vision_end>,
    ``post`` question tokens. ``h, w`` in patches (12 x 12: uneven 4 x 4 windows)."""
    g = torch.Generator().manual_seed(seed)
    n_tok = t * (h // 2) * (w // 2)
    text = lambda n: [int(x) for x in torch.randint(3, 150, (n,), generator=g)]  # noqa: E731
    ids = text(pre) + [VSTART] + [VID if video else IMG] * n_tok + [VEND] + text(post)
    pix = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g).to(device=device, dtype=dtype)
    grid = torch.tensor([[t, h, w]], device=device)
    out = dict(input_ids=torch.tensor([ids], device=device),
               attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
    if video:
        out.update(pixel_values_videos=pix, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]))
    else:
        out.update(pixel_values=pix, image_grid_thw=grid)
    return out


def batch_of_two(device="cpu") -> dict:
    """Two prompts with different image sizes and text lengths, left-padded into one batch."""
    a = visual_inputs(12, 12, 3, 6, seed=1, device=device)
    b = visual_inputs(8, 12, 2, 4, seed=2, device=device)
    La, Lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    L = max(La, Lb)
    ids = torch.full((2, L), 2, device=device)
    mask = torch.zeros(2, L, dtype=torch.long, device=device)
    ids[0, L - La:], mask[0, L - La:] = a["input_ids"][0], 1
    ids[1, L - Lb:], mask[1, L - Lb:] = b["input_ids"][0], 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]))
