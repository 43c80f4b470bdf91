"""PatchConv2d: the same convolution as nn.Conv2d (outputs and gradients), on any input size."""

import pytest
import torch
from torch import nn

from simmim import runtime
from simmim.kernels import PatchConv2d


@pytest.mark.parametrize(
    ("shape", "cin", "cout", "k", "channels_last_view"),
    [((2, 3, 32, 32), 3, 8, 4, False), ((2, 3, 35, 30), 3, 8, 4, False), ((3, 16, 2, 2), 16, 48, 1, True)],
)
def test_patch_conv_matches_conv2d(shape, cin, cout, k, channels_last_view):
    torch.manual_seed(0)
    conv = PatchConv2d(cin, cout, k).double()
    assert isinstance(conv, nn.Conv2d) and set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last_view:  # SimMIM's head input: a permuted [B, H, W, C] feature map
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    x.requires_grad_(True)
    out = conv(x)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    with runtime.reference_kernels():  # plain F.conv2d
        ref = conv(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
