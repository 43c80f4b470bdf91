"""Non-overlapping convolutions (kernel = stride: the patch embedding, SimMIM's 1x1 head) as one linear product on CPU.

Why: a convolution whose windows do not overlap is a reshape and a matrix product, and oneDNN's convolution is slow
at these shapes on CPU: forward + backward of the nano's 1x1 head (64 x 256 -> 3072) 26.6 ms against 4.0 ms as a
linear, the patch embedding of SwinV2-T at 192 px (batch 8, 3 -> 96, 4x4) 29.7 against 14.2 ms (1 thread; see
benchmarks/RESULTS.md). The product goes through :func:`simmim.kernels.linear.linear`, so its own CPU choices apply.
Other devices, and :func:`simmim.runtime.reference_kernels`, run ``F.conv2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from simmim import runtime
from simmim.kernels.linear import linear

__all__ = ["PatchConv2d"]


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``stride = kernel_size`` (same parameters, initialisation, state-dict keys and
    ``isinstance``); on CPU its product runs as a linear layer over the flattened patches."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not runtime.kernels_enabled() or x.ndim != 4:
            return super().forward(x)
        (kh, kw), (n, c, hi, wi) = self.kernel_size, x.shape
        h, w = hi // kh, wi // kw
        if (kh, kw) == (1, 1):
            patches = x.permute(0, 2, 3, 1)  # free when x is a channels-last view, as SimMIM's head input is
        else:
            # a stride-k convolution drops the rows and columns past the last whole patch
            patches = x[:, :, : h * kh, : w * kw].reshape(n, c, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5)
        out = linear(patches.reshape(n, h, w, c * kh * kw), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.permute(0, 3, 1, 2)
