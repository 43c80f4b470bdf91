"""Linear layers on CPU through oneDNN, with a hand-written backward.

Why: ATen's CPU ``addmm`` runs float32 products on MKL's sgemm, which on AMD CPUs takes a generic path at about
half of what the cores do (SwinV2-T's linear layers: ~210 GFLOP/s here, against ~440 through oneDNN's JIT kernels),
and adds the bias in a pass of its own over the output. oneDNN's inner product (``mkldnn::_linear_pointwise``, the
kernel inductor emits for CPU linears) fuses the bias and runs float32 at full width; results agree with
``F.linear`` to float32 / bfloat16 rounding. Float32 gradients go through oneDNN too; bfloat16 gradients, where
ATen already calls oneDNN, stay on ATen.

``simmim.models.ops.ONEDNN_LINEAR = False`` (or ``SIMMIM_ONEDNN_LINEAR=0`` in the environment) falls back to
``F.linear`` everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["linear", "ONEDNN_LINEAR"]

ONEDNN_LINEAR = os.environ.get("SIMMIM_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
_DTYPES = (torch.float32, torch.bfloat16)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) by oneDNN's inner product (strided operands allowed)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
        g, x2 = grad.reshape(-1, n), x.reshape(-1, k)
        fp32 = grad.dtype == torch.float32
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (_onednn(g, weight.t().contiguous()) if fp32 else g @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            if not fp32:
                grad_w = g.t() @ x2
            elif n > k:  # oneDNN is fastest with the wider of the two as its output columns (2x on 18432 x 96 x 384)
                grad_w = _onednn(x2.t(), g.t()).t()
            else:
                grad_w = _onednn(g.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (autocast included); float32 and bfloat16 on CPU through oneDNN (see the module docstring)."""
    if not ONEDNN_LINEAR or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        dtype = torch.get_autocast_dtype("cpu")
        if dtype not in _DTYPES:
            return F.linear(x, weight, bias)
        # the casts autocast would make, here so that autograd records them (gradients return in float32)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        return _OneDNNLinear.apply(x, weight, bias)
