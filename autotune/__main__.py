"""``python -m sparsevila_ops.autotune``: see ``cli.py``."""
import sys

from .cli import main

sys.exit(main())
