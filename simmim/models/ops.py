"""Float32 linear layers on CPU through oneDNN, with a hand-written backward.

Why: ATen's CPU ``addmm`` runs float32 products on MKL's sgemm, which on AMD CPUs takes a generic path at about
half of what the cores do (here ~210 GFLOP/s, against ~440 through oneDNN's JIT kernels), and adds the bias in a
pass of its own over the output. oneDNN's inner product (``mkldnn::_linear_pointwise``, the kernel inductor emits
for CPU linears) fuses the bias and runs at full AVX-512 width, for the forward product and both gradient products;
results agree with ``F.linear`` to float32 rounding; ``torch.compile`` keeps the kernel as an opaque op. Everything
else (bfloat16 autocast, where ATen already calls oneDNN and the fused bias measured within noise; other devices and
dtypes) is ``F.linear``.

Used where :func:`simmim.runtime.fast_paths` measured it faster than ``F.linear`` on this CPU (see there; on
AVX2-only CPUs MKL wins and ``F.linear`` is used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simmim import runtime

__all__ = ["linear", "onednn_linear"]


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


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        # oneDNN takes transposed operands at full speed, other strides (rows with gaps) on slow paths
        g, x2 = grad.contiguous().view(-1, n), x.view(-1, k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(g, weight.t().contiguous()).view(x.shape)
        if ctx.needs_input_grad[1]:
            # oneDNN is fastest with the wider of the two as its output columns (2x for 18432 x 96 x 384)
            grad_w = _onednn(x2.t(), g.t()).t() if n > k else _onednn(g.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 CPU linear through oneDNN, forward and backward (whatever :func:`simmim.runtime.fast_paths` says)."""
    return _OneDNNLinear.apply(x.contiguous(), weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; float32 on CPU (outside autocast) through oneDNN where that is faster (module docstring)."""
    if (
        x.device.type != "cpu"
        or not runtime.kernels_enabled()
        or not runtime.fast_paths().onednn_linear
        or torch.is_autocast_enabled("cpu")
        or not all(t.dtype == torch.float32 for t in (x, weight, bias) if t is not None)
    ):
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias)
