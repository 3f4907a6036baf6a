"""Command line: ``python -m sparsevila_ops <command> [options]``; ``--help`` lists the commands.

A command is a module with ``main(argv) -> int`` (exit status); add one with a line in ``COMMANDS``.
"""
import importlib
import sys

# name -> (module, one-line description); modules are imported only when their command runs.
COMMANDS = {
    "demo": ("sparsevila_ops.demo", "the whole pipeline on synthetic inputs, on the GPU if present (else the "
                                    "CPU reference)"),
    "fuzz": ("sparsevila_ops.fuzz", "seeded fuzzing of a backend against the reference, a repro line per failure"),
    "autotune": ("sparsevila_ops.autotune.cli", "kernel configs: tune (GPU), show, clear and export the per-GPU "
                                                "tables"),
    "warmup": ("sparsevila_ops._cuda", "build the cuda backend's kernels into the cache now (nvcc, ninja, pybind11; "
                                       "no GPU needed)"),
}
USAGE = "usage: python -m sparsevila_ops <command> [options]   (<command> --help for its options)"


def _help() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([USAGE, "", "commands:"] + [f"  {n:<{width}}  {d}" for n, (_, d) in COMMANDS.items()])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{_help()}\n\nerror: {got}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
