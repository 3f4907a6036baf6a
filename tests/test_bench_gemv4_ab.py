"""bench/gemv4_ab.py: the same-machine A/B of two gemv4 probe builds, from their sweep logs (CPU)."""
import math

from bench import gemv4_ab


def _sweep(path, us: dict, best: dict, csplit: bool = False):
    """A probe ``time`` log: one cfg line per (M, shape, aw) -> µs, then one TIME line per (M, shape)."""
    lines = []
    for (M, shape, aw), t in us.items():
        extra = " csplit=1" if csplit else ""
        lines.append(f"  cfg M={M} {shape} tiles=2 warps=8/8 stages=2 aw={aw}{extra} {t:.2f} us 1.00 TB/s")
    for (M, shape), t in best.items():
        lines.append(f"TIME M={M} {shape:<8} N= 3584 K= 3584 best {t:.2f} us (1.00 TB/s) tiles=2 warps=8/8 "
                     "stages=2 aw=1")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_report_geomeans_per_aw_spread_and_layer_sums(tmp_path, capsys):
    shapes = ("qkv", "o", "gate_up", "down")
    a_us = {(1, s, aw): 10.0 + i for i, s in enumerate(shapes) for aw in (0, 1)}
    b_us = {k: v * (0.9 if k[2] == 0 else 1.0) for k, v in a_us.items()}  # B: aw=0 configs 10 % faster
    best = {(1, s): 10.0 + i for i, s in enumerate(shapes)}
    a = [_sweep(tmp_path / f"a{r}.log", a_us, best) for r in (1, 2)]
    # B's logs name its new option at the default (csplit=1): still HEAD's configs
    b = [_sweep(tmp_path / f"b{r}.log", b_us, {k: 0.9 * v for k, v in best.items()}, csplit=True) for r in (1, 2)]
    assert gemv4_ab.main(a + ["--"] + b) == 0
    out = capsys.readouterr().out
    assert "aw=0: geomean 0.9000 over 4 configs" in out and "aw=1: geomean 1.0000 over 4 configs" in out
    assert "A's own spread: mean |log ratio| of its two sweeps 0.0000 over 8 configs" in out
    assert f"A sweep 1: M=1 layer {sum(best.values()):.2f}" in out
    assert f"B sweep 2: M=1 layer {0.9 * sum(best.values()):.2f}" in out
    assert math.isclose(gemv4_ab.geomean([2.0, 8.0]), 4.0)


def test_usage_without_both_sides(capsys):
    assert gemv4_ab.main(["a.log"]) == 2 and gemv4_ab.main(["a.log", "--"]) == 2
    assert "usage" in capsys.readouterr().err
