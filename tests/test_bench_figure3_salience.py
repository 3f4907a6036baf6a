"""bench.figure3_salience's command line on the CPU: the shapes it accepts and the one-line skip without a GPU."""
import pytest
import torch

from bench import figure3_salience as f


def test_bound_shapes_hold_about_64k_tokens_around_1024():
    lengths = sorted(s.N for s in f.BOUND_SHAPES)
    assert lengths[0] < 1024 < lengths[-1]  # either side of the 1024-token frames
    assert all(60_000 <= s.B * s.N <= 66_000 for s in f.BOUND_SHAPES)
    assert not {s.name for s in f.BOUND_SHAPES} & {s.name for s in f.SHAPES}


def test_tile_bound_shapes_hold_about_64k_tokens_between_1024_and_2048():
    lengths = sorted(s.N for s in f.TILE_BOUND_SHAPES)
    assert 1024 < lengths[0] and lengths[-1] < 2048
    assert all(60_000 <= s.B * s.N <= 66_000 for s in f.TILE_BOUND_SHAPES)
    assert not {s.name for s in f.TILE_BOUND_SHAPES} & {s.name for s in f.SHAPES + f.BOUND_SHAPES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_a_bound_shape_is_accepted_by_name_and_skips_without_a_gpu(capsys):
    assert f.main(["--shape", f.BOUND_SHAPES[1].name]) == 0
    assert capsys.readouterr().out.strip() == "bench.figure3_salience: needs a CUDA GPU; skipped"
    with pytest.raises(SystemExit):
        f.main(["--shape", "no such shape"])
