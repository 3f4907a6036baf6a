"""Command line: ``python -m sparsevila_ops {demo,fuzz} ...``."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmds = {"demo": "sparsevila_ops.demo", "fuzz": "sparsevila_ops.fuzz"}
    if not argv or argv[0] not in cmds:
        print("usage: python -m sparsevila_ops {demo,fuzz} [options]   (-h after a command for its options)")
        return 2
    import importlib
    return importlib.import_module(cmds[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
