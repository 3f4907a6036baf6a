"""bench.gemv_folds on the CPU (the op's reference backend, tiny shapes): its layer variants compute one layer, and
it skips without a GPU."""
import pytest
import torch

import sparsevila_ops as so
from bench import gemv_folds as bf


def test_the_layer_variants_compute_the_same_layer():
    """The four GEMVs alone differ (no norms, no adds); eager and folded agree within the rounding of the normalized
    x (the fold keeps it in fp32)."""
    gen = torch.Generator().manual_seed(0)
    w = bf._weights(gen, layers=1, hidden=64, inter=96, qkv=96, device="cpu")[0]
    x, a = (torch.randn(1, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    variants = bf._layer_variants(so)
    assert list(variants) == ["four GEMVs alone", "eager norms and adds", "inductor norms and adds", "folded"]
    eager, folded = variants["eager norms and adds"](w, x, a), variants["folded"](w, x, a)
    assert (folded.float() - eager.float()).norm() <= 2e-2 * eager.float().norm()
    assert not torch.allclose(variants["four GEMVs alone"](w, x, a).float(), eager.float(), rtol=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_skips_without_a_gpu(capsys):
    assert bf.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.gemv_folds: needs a CUDA GPU; skipped"
