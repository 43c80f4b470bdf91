"""simmim.models.ops.linear (oneDNN on CPU) against F.linear: outputs, gradients, dtypes, fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import simmim.models.ops as ops
from simmim.models.ops import linear

pytestmark = pytest.mark.skipif(not ops.ONEDNN_LINEAR, reason="torch built without oneDNN (mkldnn)")


def _grads(fn, x, weight, bias, autocast: bool):
    tensors = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    args = tensors + [None] * (3 - len(tensors))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(g)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("shape", [(7, 3, 40), (2, 5, 6, 40), (300, 40)])
@pytest.mark.parametrize("out_features", [24, 40, 96])  # the weight gradient takes a different route for n > k
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_matches_f_linear(shape, out_features, with_bias):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(shape, generator=g), torch.randn(out_features, 40, generator=g), torch.randn(out_features)
    b = b if with_bias else None
    got, got_grads = _grads(linear, x, w, b, autocast=False)
    ref, ref_grads = _grads(F.linear, x.double(), w.double(), None if b is None else b.double(), autocast=False)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got_grads, ref_grads):
        assert a.dtype == torch.float32 and a.shape == r.shape
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)


def test_bfloat16_autocast_matches_f_linear_bit_for_bit():
    """Under CPU autocast: bf16 output, float32 gradients for float32 leaves, as F.linear gives them."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 9, 32, generator=g), torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    got, got_grads = _grads(linear, x, w, b, autocast=True)
    ref, ref_grads = _grads(F.linear, x, w, b, autocast=True)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for a, r in zip(got_grads, ref_grads):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_fallbacks(monkeypatch):
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))  # float64: no oneDNN kernel, plain F.linear
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", False)
    x, w = x.float().requires_grad_(), w.float()
    out = linear(x, w)
    assert out.grad_fn.name() != "_OneDNNLinearBackward"
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", True)
    assert linear(x, w).grad_fn.name() == "_OneDNNLinearBackward"
