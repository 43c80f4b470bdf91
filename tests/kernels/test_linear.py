"""simmim.kernels.linear: float32 through oneDNN on CPU against F.linear (outputs, gradients, fallbacks), and the
Linear module wrappers and hooks see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd

from simmim import runtime
from simmim.kernels import Linear, linear, onednn_linear, plain_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN (mkldnn)")


def _grads(fn, x, weight, bias):
    tensors = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*tensors, *[None] * (3 - len(tensors)))
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
    got, got_grads = _grads(onednn_linear, x, w, b)
    ref, ref_grads = _grads(F.linear, x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(got_grads, ref_grads):
        assert a.dtype == torch.float32 and a.shape == r.shape
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)


def test_other_dtypes_autocast_and_the_switch_take_f_linear():
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(24, 16)
    with runtime.overridden(onednn_linear=True):
        assert linear(x, w).grad_fn.name() == "_OneDNNLinearBackward"
        with runtime.reference_kernels():
            assert linear(x, w).grad_fn.name() == "MmBackward0"
    assert linear(x.double(), w.double()).grad_fn.name() == "MmBackward0"  # no oneDNN float64 kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == "MmBackward0"
    with runtime.overridden(onednn_linear=False):
        assert linear(x, w).grad_fn.name() == "MmBackward0"
    # layers of fewer than NARROW outputs stay on F.linear; of fewer inputs take the weight gradient's fast orientation
    with runtime.overridden(onednn_linear=True):
        assert linear(x, w[:5]).grad_fn.name() == "MmBackward0"
        narrow = linear(x[:, :2], w[:, :2].clone().requires_grad_())
        assert narrow.grad_fn.name() == "_NarrowLinearBackward"


@pytest.mark.slow
def test_compiled_graph_keeps_the_onednn_kernel():
    """Under torch.compile the kernel is an opaque op (inductor lowers mkldnn linears only for frozen weights):
    same outputs and gradients as eager."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 5, 40, generator=g), torch.randn(96, 40, generator=g), torch.randn(96, generator=g)

    def fn(x, w, b):
        return torch.nn.functional.gelu(onednn_linear(x, w, b)).square()

    ref, ref_grads = _grads(fn, x, w, b)
    got, got_grads = _grads(torch.compile(fn, fullgraph=True), x, w, b)  # inductor
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r)
    graphs = []

    def record(gm, inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm

    _grads(torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), x, w, b)
    assert len(graphs) == 2 and all("simmim.onednn_linear.default" in ops_seen for ops_seen in graphs), graphs


def test_strided_inputs_and_gradients():
    """A column slice (rows with gaps) as input and a non-contiguous incoming gradient: same as F.linear."""
    g = torch.Generator().manual_seed(0)
    big, w = torch.randn(50, 120, generator=g), torch.randn(30, 40, generator=g)
    results = []
    for fn in (onednn_linear, F.linear):
        leaf, weight = big.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(leaf[:, 40:80], weight)
        out[:, ::2].square().sum().backward()  # gradient zero in every other column
        results.append((out, leaf.grad, weight.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_linear_module_is_an_nn_linear_with_the_kernel_inside():
    """Linear keeps nn.Linear's parameters, keys and isinstance (so wrappers and hooks find it), runs the kernel,
    takes in-place ops after it (nn.ReLU(inplace=True)), and plain_linears hands exact-type tools an nn.Linear."""
    torch.manual_seed(0)
    layer = Linear(8, 5)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 3, 8, requires_grad=True)
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with runtime.overridden(onednn_linear=True):
        out = torch.nn.ReLU(inplace=True)(layer(x))
        out.sum().backward()
    assert seen == [(2, 3, 5)]
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias).relu())
    torch.testing.assert_close(x.grad, ((F.linear(x, layer.weight, layer.bias) > 0).float() @ layer.weight))
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    assert plain_linears(model) is model and type(model[0]) is torch.nn.Linear
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert type(quantized[0]).__name__ == "Linear" and type(quantized[0]) is not torch.nn.Linear


def test_tensor_subclass_weights_take_f_linear():
    """Weights that are tensor subclasses (quantised, sharded, ...) go to F.linear, which dispatches on them."""

    class Tagged(torch.Tensor):
        pass

    x, w = torch.randn(3, 8), torch.randn(5, 8).as_subclass(Tagged)
    with runtime.overridden(onednn_linear=True):
        assert isinstance(linear(x, w), Tagged)


@pytest.mark.parametrize("onednn", [True, False])
def test_narrow_layers_match_f_linear(onednn):
    """The Log-CPB MLP's shapes (2 inputs -> 512, 512 -> 3 outputs) on every route: same outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    for shape in ((529, 2), (529, 512)):
        x = torch.randn(shape, generator=g)
        w, b = torch.randn(512 if shape[1] == 2 else 3, shape[1], generator=g), None
        with runtime.overridden(onednn_linear=onednn):
            got, got_grads = _grads(linear, x, w, b)
        ref, ref_grads = _grads(F.linear, x.double(), w.double(), None)
        # float32 against float64: sums of 512 products of N(0, 1) values (~20) carry ~1e-5 of rounding
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
        for a, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)
