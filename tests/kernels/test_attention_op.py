"""simmim.kernels.attention: the CPU op (forward, backward, registration) against its plain reference and SDPA."""

import pytest
import torch

import simmim.kernels.attention as attention
from simmim import runtime
from simmim.kernels import cosine_window_attention, fused_attention, sdpa_attention
from simmim.kernels.attention import _reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _inputs(bw: int, n: int, nh: int, hd: int, groups: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(bw, n, 3 * nh * hd, generator=g, dtype=dtype)
    scale = torch.rand(nh, 1, 1, generator=g, dtype=dtype) * 20
    bias = torch.randn(groups * nh, n, n, generator=g, dtype=dtype)
    bias[:, :, -2:] = -100.0  # some masked keys
    w = torch.randn(bw, n, nh * hd, generator=g, dtype=dtype)
    return qkv, scale, bias, w


def _with_grads(fn, qkv, scale, bias, w):
    inputs = [t.clone().requires_grad_(True) for t in (qkv, scale, bias)]
    out = fn(*inputs)
    return [out, *torch.autograd.grad((out * w.to(out.dtype)).sum(), inputs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_op_registration(dtype):
    """The custom op's fake kernels, schema and autograd registration agree with its real outputs (what
    torch.compile relies on), for float32 and for bfloat16 inputs with a float32 bias (autocast)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 9, 24, generator=g).to(dtype).requires_grad_(True)
    scale = (torch.rand(2, 1, 1, generator=g) * 20).requires_grad_(True)
    bias = torch.randn(6, 9, 9, generator=g).requires_grad_(True)
    torch.library.opcheck(cosine_window_attention, (qkv, scale, bias))
    with torch.no_grad():
        out, heads, norms, attn = cosine_window_attention(qkv, scale, bias)
    backward = torch.ops.simmim.cosine_window_attention_backward_v2
    torch.library.opcheck(backward, (torch.randn_like(out), heads, scale.detach(), norms, attn))


@pytest.mark.parametrize("groups", [3, 1])
def test_cpu_attention_matches_reference_and_sdpa(groups):
    """The hand-written CPU attention (forward and backward) equals its plain autograd reference and the SDPA kernel
    used on accelerators, for a bias per window of an image (groups=3) and one bias shared by all windows (groups=1,
    unshifted blocks)."""
    qkv, scale, bias, w = _inputs(6, 9, 2, 4, groups)  # 2 images of 3 windows
    op = _with_grads(lambda *a: cosine_window_attention(*a)[0], qkv, scale, bias, w)
    for fn in (_reference, sdpa_attention):
        for a, b in zip(op, _with_grads(fn, qkv, scale, bias, w)):
            assert rel_err(a, b) <= 1e-12
    if groups == 1:  # the shared bias gives what the same bias tiled per window gives
        tiled = bias.repeat(3, 1, 1).requires_grad_(True)
        out = cosine_window_attention(qkv, scale, tiled)[0]
        assert rel_err(out, op[0]) <= 1e-12
        grad = torch.autograd.grad((out * w).sum(), tiled)[0]
        assert rel_err(grad.view(3, 2, 9, 9).sum(0), op[3]) <= 1e-12


@pytest.mark.parametrize("n,hd", [(9, 24), (16, 32), (36, 24), (36, 32)])
def test_cpu_attention_bfloat16_matches_float64(monkeypatch, n, hd):
    """bfloat16 q, k, v with a float32 bias (autocast) through the op, in small chunks, agree with float64 within
    bfloat16 rounding, on every path: rows under 32 keys (softmax backward via float32) or not, heads under 32
    channels (per-row factors written out) or not."""
    monkeypatch.setattr(attention, "SOFTMAX_CHUNK_BYTES", 8 * n * n)  # several chunks in forward and backward
    g = torch.Generator().manual_seed(0)
    bw, nh = 6, 2
    qkv = torch.randn(bw, n, 3 * nh * hd, generator=g).bfloat16()
    scale = torch.rand(nh, 1, 1, generator=g) * 20 + 1
    bias = torch.randn(3 * nh, n, n, generator=g) * 4
    w = torch.randn(bw, n, nh * hd, generator=g)
    got = _with_grads(lambda *a: cosine_window_attention(*a)[0], qkv, scale, bias, w)
    for reference in (_reference, sdpa_attention):
        ref = _with_grads(reference, qkv.double(), scale.double(), bias.double(), w.double())
        for name, a, b in zip(("out", "qkv", "scale", "bias"), got, ref):
            assert rel_err(a.double(), b) <= 3e-2, name  # observed up to 1.8e-2


def test_kernel_choice_follows_the_runtime():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with runtime.overridden(cpu_attention=True):
        assert fused_attention(cpu) is not None and fused_attention(cpu, dropout=0.1) is None
        assert fused_attention(meta) is sdpa_attention  # accelerators: SDPA's fused kernels
        with runtime.reference_kernels():
            assert fused_attention(cpu) is None and fused_attention(meta) is None
    with runtime.overridden(cpu_attention=False):
        assert fused_attention(cpu) is None
