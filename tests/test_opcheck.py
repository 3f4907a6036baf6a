"""``torch.library.opcheck`` on every op of ``torch.ops.sparsevila`` (schema, fake impl, aot dispatch), with
small CPU inputs on the reference backend.

Outputs are poisoned (NaN / sentinel) so the checks compare what the op actually wrote.
"""
from __future__ import annotations

import pytest
import torch

import sparsevila_ops as so  # registers torch.ops.sparsevila
from helpers import poison

I32 = torch.int32


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _i32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=I32)


def _visual_salience():
    g = _g()
    q = torch.randn(12, 3, 2, 8, generator=g)[:, 0]  # strided view of a fused QKV tensor
    k = torch.randn(12, 2, 8, generator=g)
    lse = torch.randn(2, 12, generator=g)
    cu = _i32([0, 5, 5, 12])
    return [(q, k, cu, 7, 0.3, 0, None, False, poison(torch.empty(12))),
            (q, k, cu, 7, 0.3, 2, lse, True, poison(torch.empty(2, 12)))]


def _prefill_common():
    g = _g()
    q = torch.randn(6, 8, 8, generator=g)[:, :4]
    k = torch.randn(12, 2, 8, generator=g)
    v = torch.randn(2, 12, 8, generator=g).transpose(0, 1)
    return q, k, v, _i32([0, 2, 6]), _i32([0, 5, 12]), 4, 7


def _prefill_attention():
    q, k, v, cq, ck, mq, mk = _prefill_common()
    return [(q, k, v, cq, ck, mq, mk, 0.35, causal, poison(torch.empty(6, 4, 8)), poison(torch.empty(4, 6)))
            for causal in (True, False)]


def _prefill_attention_relevance():
    q, k, v, cq, ck, mq, mk = _prefill_common()
    return [(q, k, v, cq, ck, mq, mk, 0.35, True, _i32([[0, 2], [1, 4]]), poison(torch.empty(6, 4, 8)),
             poison(torch.empty(4, 6)), poison(torch.empty(2, 12)))]


def _kv_relevance():
    q, k, _, cq, ck, mq, mk = _prefill_common()
    lse = torch.randn(4, 6, generator=_g()) + 3
    return [(q, k, lse, cq, ck, mq, mk, 0.35, True, _i32([[0, 2], [3, 4]]), poison(torch.empty(2, 12)))]


def _select_kv():
    scores = torch.randint(0, 3, (2, 2, 2, 10), generator=_g()).float()  # [L, B, Hk, T], ties
    return [(scores, _i32([1, 0]), _i32([8, 3]), 4, poison(torch.empty(2, 2, 2, 4, dtype=I32)))]


def _pack_kv():
    g = _g()
    k = [torch.randn(2, 10, 2, 8, generator=g).transpose(1, 2) for _ in range(2)]
    v = [torch.randn(2, 2, 10, 8, generator=g) for _ in range(2)]
    idx = _i32([[[[1, 4, 6], [2, 3, 7]], [[0, 5, -1], [1, 2, -1]]]] * 2)  # row 1: span of 2
    return [(k, v, idx, _i32([1, 3]), _i32([8, 5]), _i32([10, 9]), torch.randn(2, 2, 2, 9, 8, generator=g),
             torch.randn(2, 2, 2, 9, 8, generator=g), poison(torch.empty(2, dtype=I32)))]


def _decode_attention():
    g = _g()
    q = torch.randn(3, 4, 8, generator=g)
    k = torch.randn(3, 6, 2, 8, generator=g).transpose(1, 2)
    v = torch.randn(3, 2, 6, 8, generator=g)
    return [(q, k, v, _i32([0, 3, 6]), 0.3, poison(torch.empty(3, 4, 8)), poison(torch.empty(3, 4)))]


def _append_kv():
    g = _g()
    return [(torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g),
             torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), _i32([0, 4]))]


def _rope_append_kv():
    g = _g()
    angles = torch.rand(2, 8, generator=g) * 6.283
    return [(torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g),
             angles.cos(), angles.sin(), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g),
             _i32([0, 4]), poison(torch.empty(2, 4, 8)))]


def _sparse_decode_attention():
    g = _g()
    q = torch.randn(2, 4, 8, generator=g)
    kc = torch.randn(2, 2, 10, 8, generator=g)
    vc = torch.randn(2, 2, 10, 8, generator=g)
    idx = _i32([[[0, 3, 9, -1]] * 2, [[1, 2, 5, 8]] * 2])
    return [(q, kc, vc, idx, _i32([3, 4]), 0.3, poison(torch.empty(2, 4, 8)), poison(torch.empty(2, 4)))]


def _gemv():
    g = _g()
    x = torch.randn(3, 24, generator=g).to(torch.bfloat16)[:, 4:]  # strided rows
    w = torch.randn(10, 20, generator=g).to(torch.bfloat16)
    b = torch.randn(10, generator=g).to(torch.bfloat16)
    n = torch.randn(20, generator=g).to(torch.bfloat16)
    r = torch.randn(1, 10, generator=g).to(torch.bfloat16)
    return [(x, w, b, True, None, 0.0, None, poison(torch.empty(3, 5, dtype=torch.bfloat16))),
            (x, w, None, False, None, 0.0, None, poison(torch.empty(3, 10, dtype=torch.bfloat16))),
            (x[:1], w, b, False, n, 1e-6, r, poison(torch.empty(1, 10, dtype=torch.bfloat16)))]


CASES = {
    "visual_salience": _visual_salience,
    "prefill_attention": _prefill_attention,
    "prefill_attention_relevance": _prefill_attention_relevance,
    "kv_relevance": _kv_relevance,
    "select_kv": _select_kv,
    "pack_kv": _pack_kv,
    "decode_attention": _decode_attention,
    "append_kv": _append_kv,
    "rope_append_kv": _rope_append_kv,
    "sparse_decode_attention": _sparse_decode_attention,
    "gemv": _gemv,
}


def test_every_op_is_covered():
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsevila::")}
    assert ops == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    op = getattr(torch.ops.sparsevila, name)
    with so.use_backend("reference"):
        for args in CASES[name]():
            torch.library.opcheck(op, args)
