"""bench/ncu_sass_stalls.py: the summary of an ncu source page (CPU, a synthetic page in ncu's CSV layout)."""
import csv

from bench import ncu_sass_stalls

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "Instructions Executed", "stall_mio", "stall_wait", "stall_long_sb", "stall_mio (Not Issued)"]


def page(path, launches):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for name, rows in launches:
            w.writerow(["Kernel Name", name, ""])
            w.writerow(HEADER)
            for r in rows:
                w.writerow(r)


def test_summary_counts_stalls_mix_and_hot_instructions(tmp_path):
    rows = [["0x0", "      MUFU.EX2 R1, R2", "60", "50", "300", "40", "20", "0", "99"],
            ["0x10", "      FFMA.FTZ R3, R1, R4, R5", "10", "5", "300", "0", "10", "0", "0"],
            ["0x20", "@!P0  BRA 0x7f00", "30", "30", "400", "0", "0", "30", "0"]]
    page(tmp_path / "p.csv", [("kernel_a", rows), ("kernel_b", rows[:1])])
    launches = ncu_sass_stalls.launches(str(tmp_path / "p.csv"))
    assert [x["name"] for x in launches] == ["kernel_a", "kernel_b"] and len(launches[0]["rows"]) == 3
    text = ncu_sass_stalls.summarize(launches[0], hot=0.25)
    assert "kernel_a: 100 samples, 1000 instructions" in text
    assert "stalls: mio 40.0%, wait 30.0%, long_sb 30.0%" in text  # "(Not Issued)" columns not counted twice
    assert "mix: BRA 40.0%, MUFU 30.0%, FFMA 30.0%" in text  # the guard @!P0 skipped, the opcode's first word
    assert "samples by opcode: MUFU 60.0%, BRA 30.0%, FFMA 10.0%" in text
    hot = [line for line in text.splitlines() if line.startswith("  [")]
    assert len(hot) == 2 and "MUFU.EX2" in hot[0] and "mio 40" in hot[0] and "BRA" in hot[1]  # FFMA's 10 % is not hot
    assert "[" not in ncu_sass_stalls.summarize(launches[1], hot=None)
