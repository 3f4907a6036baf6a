"""HF transformers integrations (``pip install sparsevila_ops[hf]``, transformers 5.17).

``enable(model, prefill_sparsity=0.75, decode_sparsity=0.95)`` picks the integration by model type
(Qwen2.5-VL; LLaVA-OneVision, whose videos are pruned); ``disable(model)`` undoes it. The shared parts are
model-agnostic: ``SparseVILACache``, the attention functions (``attention``), the fused q/k/v and gate/up
projections (``fused``), the ViT module forwards (``vit``: LayerNorm kernel, patch GEMM, GELU epilogue), the
pipeline's ``generate`` with its cache handling, prompt pruning seam (``pipeline.Hooks``) and multi-turn
bookkeeping (``pipeline``), and the decode step's own CUDA graphs (``step_graph``); a model's module keeps its
vision tower and how it prunes a prompt.
"""
from .cache import SparseVILACache

__all__ = ["SparseVILACache", "disable", "enable"]


def enable(model, prefill_sparsity: float = 0.75, decode_sparsity: float = 0.95, **kwargs):
    """``sparsevila_ops.integrations.<model>.enable`` for the model's type; returns ``model``."""
    return _module_for(model).enable(model, prefill_sparsity, decode_sparsity, **kwargs)


def disable(model):
    """Undo ``enable``; returns ``model``."""
    return _module_for(model).disable(model)


def _module_for(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "qwen2_5_vl":
        from . import qwen2_5_vl
        return qwen2_5_vl
    if model_type == "llava_onevision":
        from . import llava_onevision
        return llava_onevision
    raise TypeError(f"model must be a supported HF model (model_type 'qwen2_5_vl' or 'llava_onevision'); got "
                    f"{type(model).__name__} with model_type {model_type!r}")
