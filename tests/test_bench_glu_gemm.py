"""bench/glu_gemm.py's kernel against its float reference (CPU: Triton's interpreter): awkward sizes, K not a
multiple of BLOCK_K, strided x rows, with and without bias; bad shapes refused."""
import pytest
import torch

from bench import glu_gemm as gg


@pytest.mark.parametrize("M,K,N,bias,cfg", [(37, 40, 24, True, (16, 16, 16, 4, 2)),
                                             (5, 64, 33, False, (16, 32, 32, 4, 2)),
                                             (64, 17, 1, True, (32, 16, 16, 4, 1))])
def test_glu_gemm_matches_the_reference(device, M, K, N, bias, cfg):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    wide = torch.randn(M, K + 9, generator=g).to(device, torch.bfloat16)
    x = wide[:, 3:3 + K]  # rows of stride K + 9
    w = (torch.randn(2 * N, K, generator=g) * K ** -0.5).to(device, torch.bfloat16)
    b = torch.randn(2 * N, generator=g).to(device, torch.bfloat16) if bias else None
    got = gg.glu_gemm(x, w, b, cfg)
    want = gg.reference(x, w, b)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    # the reference rounds the same steps; the GEMM's summation order differs by an ulp of bf16 at most per step
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    # and the enable path it competes with computes the same thing
    torch.testing.assert_close(gg.enable_path(x, w, b).float(), want.float(), rtol=2e-2, atol=2e-2)


def test_glu_gemm_refuses_bad_shapes(device):
    x = torch.randn(4, 8, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="even row count"):
        gg.glu_gemm(x, torch.randn(5, 8, device=device, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="contiguous columns"):
        gg.glu_gemm(x, torch.randn(8, 6, device=device, dtype=torch.bfloat16).t(), None)


def test_without_a_gpu_it_skips_with_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gg.main([]) == 0
    assert capsys.readouterr().out.strip() == "bench.glu_gemm: needs a CUDA GPU; skipped"
