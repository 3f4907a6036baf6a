"""The Triton backend on CPU tensors under ``TRITON_INTERPRET=1`` gives correct results for a plain user script:
the library applies the interpreter workarounds it needs itself (``sparsevila_ops._interpreter``), with no
conftest and nothing undocumented called."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# Only public API. Covers the three interpreter gaps (bf16 tl.dot, fp32->bf16 rounding, loop bounds read from
# cu_seqlens) and append_kv's scalar-masked stores.
USER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import sparsevila_ops as so

    assert os.environ["TRITON_INTERPRET"] == "1" and "conftest" not in sys.modules
    torch.manual_seed(0)
    bf16, res = torch.bfloat16, {}

    def err(out, ref):
        out, ref = out.double(), ref.double()
        return float((out - ref).norm() / ref.norm())

    B, Hk, G, cap, D = 2, 2, 2, 40, 64
    q = torch.randn(B, Hk * G, D).to(bf16)
    k, v = torch.randn(B, Hk, cap, D).to(bf16), torch.randn(B, Hk, cap, D).to(bf16)
    lengths = torch.tensor([37, 9], dtype=torch.int32)
    with so.use_backend("reference"):
        ref_out, ref_lse = so.decode_attention(q, k, v, lengths)
    with so.use_backend("triton"):
        out, lse = so.decode_attention(q, k, v, lengths)
    res["decode_out"], res["decode_lse"] = err(out, ref_out), err(lse, ref_lse)
    res["decode_dtype"] = str(out.dtype)

    kn, vn = torch.randn(B, Hk, D).to(bf16), torch.randn(B, Hk, D).to(bf16)
    with so.use_backend("triton"):
        so.append_kv(kn, vn, k, v, lengths)
    res["append_ok"] = bool(torch.equal(k[0, :, 37], kn[0]) and torch.equal(v[1, :, 9], vn[1])
                            and lengths.tolist() == [38, 10])

    cu = torch.tensor([0, 23, 40], dtype=torch.int32)
    qp, kp, vp = (torch.randn(40, h, 80).to(bf16) for h in (4, 2, 2))
    with so.use_backend("reference"):
        ref_p = so.prefill_attention(qp, kp, vp, cu, cu, 23, 23)[0]
    with so.use_backend("triton"):
        out_p = so.prefill_attention(qp, kp, vp, cu, cu, 23, 23)[0]
    res["prefill_out"] = err(out_p, ref_p)
    print("RESULT " + json.dumps(res))
""")


def test_user_script_triton_backend_on_cpu_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARSEVILA_BACKEND", "SPARSEVILA_INTERPRETER_PATCHES", "PYTEST_CURRENT_TEST")}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["decode_dtype"] == "torch.bfloat16"
    # bf16 outputs vs the reference backend on the same inputs (fp32 accumulation): a kernel computing the wrong
    # thing (e.g. tl.dot of raw bf16 bits) is off by O(1), rounding differences are ~1e-3.
    assert res["decode_out"] <= 2e-2, res
    assert res["decode_lse"] <= 1e-5, res
    assert res["prefill_out"] <= 2e-2, res
    assert res["append_ok"], res


def test_interpreter_workarounds_fix_what_they_probe():
    """On the installed Triton, after the workarounds are applied, none of the probes sees its gap any more
    (each workaround is applied only where its probe found the gap)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter runs only under TRITON_INTERPRET=1 (CPU runs of this suite)")
    import triton.runtime.interpreter as interp

    from sparsevila_ops import _interpreter

    applied = _interpreter.patch_interpreter()
    assert set(applied) == {"index", "dot_bf16", "cast_bf16"}
    assert not _interpreter._index_needed(interp)
    assert not _interpreter._dot_bf16_needed(interp)
    assert not _interpreter._cast_bf16_needed(interp)
