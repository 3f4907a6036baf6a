"""sparsevila_ops: kernels for SparseVILA-R1-style visual token sparsity in vision-language models.

Public ops (each also callable as ``torch.ops.sparsevila.<name>`` with out-variant arguments):

=========================  ===================================================================
``visual_salience``        mean attention each visual token receives in the encoder (Op 1)
``prefill_attention``      varlen causal GQA attention, optionally + question-row relevance (Op 2)
``kv_relevance``           relevance from a given LSE, when attention ran elsewhere (Op 2)
``select_kv``/``pack_kv``  top-k per (layer, b, kv-head) + gather-pack of all layers (Op 3)
``select_pack_kv``         both of the above; ``prune_visual_tokens`` for pre-LLM pruning
``decode_attention``       split-KV decode over the packed cache; ``append_kv``, ``rope_append_kv`` (Op 4)
``sparse_decode_attention``  decode that gathers by indices in the kernel (comparison point)
``gemv``                   a decode step's linear layer (1-8 rows), optionally emitting a gated MLP's silu(gate) * up,
                           folding an RMSNorm before it and a residual add after it
=========================  ===================================================================

Backends: ``reference`` (torch), ``triton`` (default on CUDA), ``cuda`` (CUDA C++ kernels of ``csrc/`` for
``visual_salience``, ``gemv`` and the ``[quant]`` extra's ``w4a16_linear``, preferred where they measured faster,
and an opt-in ``decode_attention``; ``python -m sparsevila_ops warmup`` builds them ahead of time). Override with
``SPARSEVILA_BACKEND`` or ``with sparsevila_ops.use_backend("reference"): ...``; ``available_backends(op, device)``
lists the backends that can run ``op`` on ``device`` here. The exact contract of every op: ``docs/ops.md`` in the
repository.
"""
from ._backend import available_backends, use_backend
from .decode import append_kv, decode_attention, rope_append_kv, sparse_decode_attention
from .linear import gemv
from .prefill import kv_relevance, prefill_attention
from .salience import visual_salience
from .select import pack_kv, prune_visual_tokens, select_kv, select_pack_kv

__version__ = "0.1.0"

__all__ = [
    "append_kv", "available_backends", "decode_attention", "gemv", "kv_relevance", "pack_kv", "prefill_attention",
    "prune_visual_tokens", "rope_append_kv", "select_kv", "select_pack_kv", "sparse_decode_attention", "use_backend",
    "visual_salience",
]


def _map_source_tree_subpackages() -> None:
    """Installs map the top-level ``autotune/``, ``triton_kernels/`` and ``csrc/`` (CUDA sources only; its
    ``__init__`` lets ``_cuda`` find them) to ``sparsevila_ops.autotune``, ``sparsevila_ops.triton_kernels`` and
    ``sparsevila_ops.csrc`` (pyproject.toml ``package-dir``; editable installs through setuptools' editable
    finder). Where no install does (a plain ``PYTHONPATH`` checkout, e.g. the tests run from the source tree
    without ``pip install -e``, or a legacy ``setup.py develop`` egg-link), register the same mapping from the
    source tree. Imports nothing heavy (except triton under ``TRITON_INTERPRET=1``: triton_kernels/__init__.py
    applies the interpreter workarounds of ``_interpreter``)."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("autotune", "triton_kernels", "csrc"):  # autotune first: the kernel modules import it
        name, src = f"{__name__}.{sub}", os.path.join(root, sub, "__init__.py")
        if name in sys.modules or importlib.util.find_spec(name) is not None or not os.path.isfile(src):
            continue
        spec = importlib.util.spec_from_file_location(name, src, submodule_search_locations=[os.path.dirname(src)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_map_source_tree_subpackages()
