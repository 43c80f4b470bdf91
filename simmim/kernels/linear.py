"""Linear layers on CPU behind an ``nn.Linear`` subclass: float32 products through oneDNN, and the weight gradient
of narrow layers in the fast orientation, each with a hand-written backward.

Why: ATen's CPU ``addmm`` runs float32 products on MKL's sgemm, which on AMD CPUs with AVX-512 takes a generic path
at about half of what the cores do (~210 GFLOP/s against ~440 through oneDNN's JIT kernels on the 2-core EPYC of
benchmarks/RESULTS.md) and adds the bias in a pass of its own. oneDNN's inner product (``mkldnn::_linear_pointwise``,
the kernel inductor emits for CPU linears) fuses the bias and runs at full vector width, for the forward product and
both gradient products; results agree with ``F.linear`` to float32 rounding. Everything else (bfloat16 autocast,
where ATen already calls oneDNN; other devices and dtypes; tensor subclasses such as quantised or sharded weights)
is ``F.linear``. :func:`simmim.runtime.fast_paths` decides per machine (a start-up calibration: on AVX2-only CPUs
MKL wins and ``F.linear`` runs).

The models call :class:`Linear` modules, never the function on a module's weight, so forward hooks, LoRA and adapter
wrappers (which test ``isinstance(m, nn.Linear)``), pruning (which rewrites ``m.weight``) and weight-quantising
tools see every layer. Tools that match the exact type (``torch.ao.quantization.quantize_dynamic``) take the model
after :func:`plain_linears`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simmim import runtime

__all__ = ["Linear", "linear", "onednn_linear", "plain_linears"]

_PLAIN = (torch.Tensor, nn.Parameter)
# F.linear's weight gradient g^T x for a layer of fewer inputs than this has an output of a few columns, for which MKL
# takes a slow path (the Log-CPB MLP's first layer, 2 inputs: 0.47 ms against 0.04 for (x^T g)^T, T = 529 offsets)
NARROW = 16


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) by oneDNN's inner product (transposed operands at full speed)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The same kernel as an opaque op for torch.compile: inductor lowers mkldnn::_linear_pointwise only for constant
# (frozen) weights; eager calls skip the custom op's dispatch overhead.
@torch.library.custom_op("simmim::onednn_linear", mutates_args=(), device_types="cpu")
def _inner_product_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _inner_product(x, weight, bias)


@_inner_product_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _inner_product_op(x, weight, bias)
    return _inner_product(x, weight, bias)


def _aten(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) by ATen's BLAS: the same product as :func:`_onednn`."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _autograd_function(name: str, product) -> type[torch.autograd.Function]:
    """A linear layer on 2-D inputs as an autograd function whose three products go through ``product`` (oneDNN's or
    ATen's), the weight gradient in the faster orientation."""

    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        # oneDNN takes transposed operands at full speed, other strides (rows with gaps) on slow paths
        g = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = product(g, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            # the wider of the two as the product's output columns: 2x for 18432 x 96 x 384 on oneDNN, 10x for the
            # Log-CPB MLP's [512, 2] weight on MKL (an output of 2 columns takes a slow path)
            grad_w = product(x.t(), g.t()).t() if n > k else product(g.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b

    return type(
        name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    )


_OneDNNLinear = _autograd_function("_OneDNNLinear", _onednn)
_NarrowLinear = _autograd_function("_NarrowLinear", _aten)


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: type) -> torch.Tensor:
    if x.dim() == 2:
        return fn.apply(x.contiguous(), weight, bias)
    out = fn.apply(x.contiguous().view(-1, x.shape[-1]), weight, bias)
    # not a view of the autograd function's output: in-place ops may follow (nn.ReLU(inplace=True)) without
    # autograd's copy-on-write of the whole output
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 CPU linear through oneDNN, forward and backward (whatever :func:`simmim.runtime.fast_paths` says)."""
    return _apply(x, weight, bias, _OneDNNLinear)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; float32 on CPU (outside autocast, plain tensors) through oneDNN where that is faster, and
    with the weight gradient in the fast orientation for layers of fewer than ``NARROW`` inputs. Layers of fewer
    outputs stay on ``F.linear`` (oneDNN gains nothing there and its Python backward costs ~20 us a call)."""
    if (
        x.device.type != "cpu"
        or not runtime.kernels_enabled()
        or torch.is_autocast_enabled("cpu")
        or not all(type(t) in _PLAIN and t.dtype == torch.float32 for t in (x, weight, bias) if t is not None)
    ):
        return F.linear(x, weight, bias)
    if weight.shape[1] < NARROW:
        if weight.requires_grad and torch.is_grad_enabled():
            return _apply(x, weight, bias, _NarrowLinear)
    elif weight.shape[0] >= NARROW and runtime.fast_paths().onednn_linear:
        return _apply(x, weight, bias, _OneDNNLinear)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation, state-dict keys and ``isinstance``) whose product runs through
    :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def plain_linears(model: nn.Module) -> nn.Module:
    """Turns every :class:`Linear` of ``model`` into a plain ``nn.Linear`` in place (same parameters, ``F.linear``),
    for tools that match the exact type, e.g. ``torch.ao.quantization.quantize_dynamic``; returns ``model``."""
    for m in model.modules():
        if type(m) is Linear:
            m.__class__ = nn.Linear
    return model
