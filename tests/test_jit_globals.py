"""Compiled Triton refuses a ``@triton.jit`` function that reads a plain module global (only ``tl.constexpr``
globals are allowed); the interpreter the CPU tests run under accepts it. This catches it on the CPU."""
import importlib
import pkgutil

import pytest

triton = pytest.importorskip("triton")
import sparsevila_ops.triton_kernels as tk  # noqa: E402


def _jit_functions():
    for info in pkgutil.iter_modules(tk.__path__):
        mod = importlib.import_module(f"{tk.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)  # a JITFunction, or the interpreter's InterpretedFunction
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and fn.__module__ == mod.__name__:
                yield f"{info.name}.{name}", fn


def _names(code):
    yield from code.co_names
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            yield from _names(c)


def test_jit_functions_read_no_plain_globals():
    fns = list(_jit_functions())
    assert len(fns) >= 10
    bad = [f"{where}: {n} = {fn.__globals__[n]!r}" for where, fn in fns for n in set(_names(fn.__code__))
           if n in fn.__globals__ and isinstance(fn.__globals__[n], (bool, int, float, str))]
    assert not bad, "plain globals read inside @triton.jit (make them tl.constexpr or kernel arguments): " + "; ".join(bad)
