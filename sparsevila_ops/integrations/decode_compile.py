"""The ``torch.compile`` config of the decode step ``generate`` compiles (model-agnostic).

transformers compiles a decode step over a compileable cache with ``CompileConfig()`` (mode ``reduce-overhead``:
CUDA graphs) unless ``generation_config.compile_config`` says otherwise. On Hopper and later the integration adds
inductor's programmatic dependent launch for inductor's own Triton kernels (``triton.enable_pdl``): each may start
while its predecessor drains and waits in ``griddepcontrol.wait`` before reading what that predecessor writes, as
the library's kernels already do. Measured on the H200 (Qwen2.5-VL-7B, 128k visual tokens, bench/NOTES.md): decode
steps 1-6 % shorter than in earlier runs without it; ``bench/pdl_check.py`` found every inductor kernel of the step
waiting before its first read, and the tokens equal to those without PDL in 20 of 20 repeats.
"""
from __future__ import annotations

import torch


def decode_compile_config(device: torch.device, cudagraphs: bool = True):
    """``CompileConfig(mode=None, options={"triton.cudagraphs": True, "triton.enable_pdl": True})`` (transformers'
    default plus PDL) for a CUDA ``device`` of compute capability >= 9.0 with an inductor that has the option; else
    None (keep transformers' default). ``cudagraphs=False`` (the step captured by ``step_graph`` instead of
    inductor's CUDA-graph trees): ``{"triton.cudagraphs": False}`` plus PDL where it applies, for any CUDA device."""
    if device.type != "cuda":
        return None
    import torch._inductor.config as inductor_config
    from transformers import CompileConfig

    pdl = torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(inductor_config.triton, "enable_pdl")
    if not pdl and cudagraphs:
        return None
    return CompileConfig(mode=None, options={"triton.cudagraphs": cudagraphs, **({"triton.enable_pdl": True} if pdl
                                                                                 else {})})


def with_decode_compile(kwargs: dict, generation_config, device: torch.device, cuda_graph: bool,
                        step_graph: bool = False) -> dict:
    """``generate``'s kwargs with ``compile_config=decode_compile_config(device, cudagraphs=not step_graph)`` added
    when the decode step is compiled (``cuda_graph``), the caller chose no compile config (neither in ``kwargs``
    nor in ``generation_config``) and there is one for the device; ``kwargs`` itself otherwise."""
    if not cuda_graph or "compile_config" in kwargs or generation_config.compile_config is not None:
        return kwargs
    config = decode_compile_config(device, cudagraphs=not step_graph)
    return kwargs if config is None else {**kwargs, "compile_config": config}
