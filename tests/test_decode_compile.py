"""The integration's decode-step compile config (``integrations/decode_compile.py``): inductor's PDL added on
sm90+ only when the caller chose no compile config; both options exist in this torch's inductor config
(torch.compile rejects unknown ones)."""
from __future__ import annotations

import torch
from transformers import CompileConfig, GenerationConfig

from sparsevila_ops.integrations import decode_compile as dc

PDL = {"triton.cudagraphs": True, "triton.enable_pdl": True}


def test_config_on_hopper_only(monkeypatch):
    import torch._inductor.config as inductor_config
    assert dc.decode_compile_config(torch.device("cpu")) is None
    for major, want in ((8, None), (9, PDL), (10, PDL)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        cfg = dc.decode_compile_config(torch.device("cuda", 0))
        assert (cfg if cfg is None else cfg.options) == want
        if cfg is not None:
            assert cfg.mode is None and all(k in inductor_config.get_config_copy() for k in cfg.options)


def test_step_graph_config_turns_inductors_graphs_off(monkeypatch):
    """For ``enable(..., step_graph=True)`` inductor captures nothing (the integration does), PDL where it applies."""
    assert dc.decode_compile_config(torch.device("cpu"), cudagraphs=False) is None
    for major, want in ((8, {"triton.cudagraphs": False}), (9, {**PDL, "triton.cudagraphs": False})):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert dc.decode_compile_config(torch.device("cuda", 0), cudagraphs=False).options == want
        kw = dc.with_decode_compile({}, GenerationConfig(), torch.device("cuda", 0), True, step_graph=True)
        assert kw["compile_config"].options == want


def test_added_only_when_the_caller_chose_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, gen = torch.device("cuda", 0), GenerationConfig()
    kw = {"max_new_tokens": 3}
    added = dc.with_decode_compile(kw, gen, cuda, cuda_graph=True)
    assert added["compile_config"].options == PDL and added["max_new_tokens"] == 3 and "compile_config" not in kw
    mine = CompileConfig()
    assert dc.with_decode_compile({"compile_config": mine}, gen, cuda, True)["compile_config"] is mine
    assert dc.with_decode_compile(kw, GenerationConfig(compile_config=mine), cuda, True) is kw
    assert dc.with_decode_compile(kw, gen, cuda, cuda_graph=False) is kw
    assert dc.with_decode_compile(kw, gen, torch.device("cpu"), True) is kw
