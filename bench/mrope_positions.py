"""Qwen2.5-VL's prompt positions (mRoPE's three rows) at Table 2's input sizes: transformers'
``get_rope_index`` against the integration's ``mrope_positions``, which finds the runs of equal token types on
the device instead of grouping them in a Python loop over every token.

Both run before the LLM's prefill, while the GPU has nothing queued: their wall time is E's (the e2e rows' E at
128k differed by ~25-80 ms between (0, 0) and (0.75, 0.95), the pruned row numbering its prompt with
``get_rope_index`` and the unpruned one, fed no ``mm_token_type_ids``, as text). The prompt is e2e's: a video of
``N`` visual tokens (``video_for_tokens``) and a 64-token question; positions and deltas must be equal.

``python -m bench.mrope_positions [--tokens N ...] [--device cuda|cpu]``: per size, the median of 5 timed calls
(after one warm-up) between device syncs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import write_results
from bench.e2e import video_for_tokens

QUESTION = 64


def _prompt(model, n_tokens: int, device) -> dict:
    """e2e's prompt without its pixels: 12 text tokens, <vision_start>, the video's tokens, <vision_end>, the
    question (the token ids' values do not matter here)."""
    cfg, video = model.config, video_for_tokens(n_tokens)
    t, h, w = video["frames"] // 2, video["h"], video["w"]
    ids = torch.cat([torch.full((12,), 5), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((video["visual_tokens"],), cfg.video_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.full((QUESTION,), 6)])[None].to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=2 * (ids == cfg.video_token_id).int(),
                video_grid_thw=torch.tensor([[t, h, w]], device=device), second_per_grid_ts=torch.tensor([1.0]))


def _time_ms(fn, device, repeats: int = 5) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def run(tokens, device) -> list:
    from sparsevila_ops.integrations.demo import build_model
    from sparsevila_ops.integrations.qwen2_5_vl import mrope_positions
    model = build_model(False, torch.device("cpu"), torch.float32)  # get_rope_index reads only the config
    rows = []
    for n in tokens:
        inp = _prompt(model, n, device)
        ids, mask, types_ = inp["input_ids"], inp["attention_mask"], inp["mm_token_type_ids"]
        grids = {k: inp[k] for k in ("video_grid_thw", "second_per_grid_ts")}
        def stock():
            return model.model.get_rope_index(ids, mm_token_type_ids=types_, attention_mask=mask, **grids)

        def ours():
            return mrope_positions(model, ids, types_, mask, grids)

        (p0, d0), (p1, d1) = stock(), ours()
        if not (torch.equal(p0, p1) and torch.equal(d0.cpu(), d1.cpu())):
            raise AssertionError(f"mrope_positions differs from get_rope_index at {n} tokens")
        t_stock, t_ours = _time_ms(stock, device), _time_ms(ours, device)
        rows.append({"prompt_tokens": ids.shape[1], "device": device.type, "get_rope_index_ms": t_stock,
                     "mrope_positions_ms": t_ours, "speedup": t_stock / t_ours})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="mrope_positions")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    rows = run(args.tokens, torch.device(args.device))
    write_results(args.name, rows, ["prompt_tokens", "device", "get_rope_index_ms", "mrope_positions_ms", "speedup"],
                  out_dir=args.out_dir, title="Qwen2.5-VL prompt positions: get_rope_index vs mrope_positions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
