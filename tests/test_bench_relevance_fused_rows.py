"""bench.relevance_fused_rows on the CPU: its arguments are the fused op's (the key's m is the segment, the question
rows its last few), the reference sums one unit of attention per question row and head, and main skips without a GPU."""
import torch

from bench import relevance_fused_rows as rf
from sparsevila_ops import autotune, reference


def test_fused_arguments_sum_the_question_rows_only():
    segs, n, rows, Hq, Hk = 2, 48, 5, 4, 2
    args = rf.fused_args(segs, n, rows, Hq=Hq, Hk=Hk, D=16, device="cpu")
    key = autotune.kernel("kv_relevance", "triton").key(*args)
    assert (key.m, key.n, key.S, key.G, key.Hk) == (n, n, segs, Hq // Hk, Hk)
    assert args[9].tolist() == [[n - rows, n]] * segs
    rel = args[10].clone()
    reference.kv_relevance(*args[:10], rel)
    per_segment = rel.view(Hk, segs, n).sum(dim=(0, 2))  # each question row's softmax sums to 1 per q head
    assert torch.allclose(per_segment, torch.full((segs,), float(rows * Hq)), rtol=1e-4)


def test_main_skips_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rf.main(["--n", "64"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
