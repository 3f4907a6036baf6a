"""Run a command while NVML samples the GPU: ``python -m bench.clocked [--period S] -- CMD [ARGS...]`` runs CMD,
then prints one ``clocks:`` line, ``bench.common.GpuSampler``'s summary over the run (the SM clock's median and
minimum, the median power, the share of readings power-capped). For probes timed outside Python (the standalone CUDA
binaries of ``bench/``), whose kernels may run below the clock their floors assume: the H200 holds 700 W by lowering
its clock (bench/NOTES.md, "The GPU's clock and power per stage"). Returns CMD's exit status."""
from __future__ import annotations

import argparse
import json
import subprocess

from bench.common import GpuSampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--period", type=float, default=0.01, help="seconds between readings (default 0.01)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to run after --")
    with GpuSampler(period_s=a.period) as gpu:
        rc = subprocess.run(cmd).returncode
    print("clocks:", json.dumps(gpu.summary() or {"readings": 0}), flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
