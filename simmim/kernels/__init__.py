"""Hand-written kernels the models call through modules and one dispatching function, each with the measured reason
it exists: float32 linear layers on oneDNN (:mod:`simmim.kernels.linear`), non-overlapping convolutions as linears
(:mod:`simmim.kernels.conv`) and the scaled cosine window attention
(:mod:`simmim.kernels.attention`). Whether each runs on this machine is :func:`simmim.runtime.fast_paths`'s decision;
:func:`simmim.runtime.reference_kernels` turns them all off (plain PyTorch ops: exports, reference checks)."""

from simmim.kernels.attention import AttentionKernel, cosine_window_attention, fused_attention, sdpa_attention
from simmim.kernels.conv import PatchConv2d
from simmim.kernels.linear import Linear, linear, onednn_linear, plain_linears

__all__ = [
    "AttentionKernel",
    "Linear",
    "PatchConv2d",
    "cosine_window_attention",
    "fused_attention",
    "linear",
    "onednn_linear",
    "plain_linears",
    "sdpa_attention",
]
