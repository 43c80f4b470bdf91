"""Scaled cosine window attention (SwinV2, paper eq. 2) as kernels: a hand-written CPU op and SDPA elsewhere.

Every kernel takes the model's calling convention: ``qkv`` [B*nW, N, 3C] (windows image-major, heads and q/k/v as
the qkv projection lays them out), the temperature ``scale`` [nH, 1, 1] (float32 at least), and an additive ``bias``
[G*nH, N, N] for each group of G consecutive windows (G = nW: position bias plus each window's mask; G = 1: one bias
shared by all windows), and returns softmax(cos(q, k) * scale + bias) v as [B*nW, N, C].

Why a CPU op: PyTorch's CPU SDPA takes its math path for a bias that needs a gradient (upcasting bfloat16), and the
autograd graph of the plain formulation makes many passes over the (windows, heads, N, N) tensors, several of them
strided. Here q, k, v are copied once to contiguous head-major layout, q and k normalised on the way (the temperature
folded into q, the factors computed in float32), logits come from one matmul per chunk, and bias add and softmax run
in float32 on a few images' logits at a time (cache-sized): under bf16 autocast the matmuls' inputs and outputs are
bfloat16 as in SDPA, the position bias (up to 16) and the softmax are not. Saved for backward: normalised q, k, v, the
norms, the probabilities. As a ``torch.library`` op it stays one opaque kernel under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from simmim import runtime

__all__ = ["AttentionKernel", "cosine_window_attention", "fused_attention", "sdpa_attention"]

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
HALF_DTYPES = (torch.float16, torch.bfloat16)
# float32 logits are handled a few images at a time: 4 MiB fits the L2/L3 share of a core on the CPUs measured, and
# 1 MiB measured 1% slower (benchmarks/RESULTS.md); a tiling constant of this kernel, not a per-CPU decision
SOFTMAX_CHUNK_BYTES = 4 << 20


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 (float32 and float64 stay)."""
    return t.float() if t.dtype in HALF_DTYPES else t


def fused_attention(device: torch.device, dropout: float = 0.0) -> AttentionKernel | None:
    """The kernel for attention on ``device``: the CPU op where :func:`simmim.runtime.fast_paths` turns it on (no
    attention dropout), SDPA on accelerators; None where the plain formula is to run (inside
    :func:`simmim.runtime.reference_kernels`, or on a CPU where the op is off)."""
    if not runtime.kernels_enabled():
        return None
    if device.type != "cpu":
        return sdpa_attention
    if dropout == 0.0 and runtime.fast_paths().cpu_attention:
        return _cpu_attention
    return None


def _cpu_attention(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    return cosine_window_attention(qkv, scale, bias)[0]


def sdpa_attention(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Normalisation (in float32 at least), the temperature folded into q, then ``scaled_dot_product_attention``."""
    bw, n, c3 = qkv.shape
    nh, g = scale.shape[0], bias.shape[0]
    q, k, v = qkv.view(bw, n, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B*nW, nH, N, hd]
    q = (F.normalize(upcast(q), dim=-1) * scale).to(v.dtype)
    k = F.normalize(upcast(k), dim=-1).to(v.dtype)
    # one group of G windows per row, its (window, head) pairs along dim 1, so the [G*nH, N, N] bias broadcasts
    q, k, v = (t.reshape(bw * nh // g, g, n, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(v.dtype), dropout_p=dropout, scale=1.0)
    return out.view(bw, nh, n, -1).transpose(1, 2).reshape(bw, n, c3 // 3)


def _reference(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op's formula in plain autograd ops, in the op's convention (its tests' reference)."""
    bw, n, c3 = qkv.shape
    nh, g = scale.shape[0], bias.shape[0]
    q, k, v = qkv.view(bw, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    probs = (logits.reshape(-1, g, n, n) + bias.to(logits.dtype)).softmax(-1).view(bw, nh, n, n)
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(bw, n, c3 // 3)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_factors(factors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row factors [..., 1] for an elementwise op with ``rows`` [..., hd], in its dtype; written out at full
    size for short half-precision rows, which the broadcast kernels do not vectorise (hd 24: ~8x slower)."""
    factors = factors.to(rows.dtype)
    # ATen's half-precision broadcast kernels run a scalar loop over rows shorter than a vector register
    if rows.dtype in HALF_DTYPES and rows.shape[-1] < runtime.fast_paths().lanes(rows.element_size()):
        return factors.expand(rows.shape).contiguous()
    return factors


def _softmax_backward_(grad: torch.Tensor, probs: torch.Tensor) -> None:
    """grad <- the gradient of the logits, in place. Short half-precision rows (windows under 32 tokens: 4-7x
    slower than float32) go through float32 in cache-sized chunks."""
    n = probs.shape[-1]
    if probs.dtype not in HALF_DTYPES or n >= runtime.fast_paths().lanes(probs.element_size()):
        torch._softmax_backward_data(grad, probs, -1, probs.dtype, grad_input=grad)
        return
    grad, probs = grad.view(-1, n), probs.view(-1, n)
    rows = max(1, min(grad.shape[0], SOFTMAX_CHUNK_BYTES // (8 * n)))
    scratch = torch.empty(2, rows, n)
    for i in range(0, grad.shape[0], rows):
        j = min(grad.shape[0], i + rows)
        g, p = scratch[0, : j - i].copy_(grad[i:j]), scratch[1, : j - i].copy_(probs[i:j])
        grad[i:j].copy_(torch._softmax_backward_data(g, p, -1, torch.float32, grad_input=g))


# The op names carry a version: bump it whenever a fake kernel (output shapes, dtypes) changes, since torch.compile's
# on-disk caches key on the graph, not on a custom op's implementation, and would replay stale output metadata.
@torch.library.custom_op("simmim::cosine_window_attention_v2", mutates_args=(), device_types="cpu")
def cosine_window_attention(
    qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B*nW, N, 3C], temperature [nH, 1, 1], bias [G*nH, N, N] (module docstring) -> (out [B*nW, N, C],
    and for the backward: normalised heads [3, B*nW, nH, N, hd], norms [2, B*nW, nH, N, 1], probabilities
    [B*nW/G, G*nH, N, N])."""
    bw, n, c3 = qkv.shape
    nh, g = scale.shape[0], bias.shape[0]
    b = bw * nh // g
    with torch.autocast("cpu", enabled=False):
        strided = qkv.view(bw, n, 3, nh, -1).permute(2, 0, 3, 1, 4)  # [3, B*nW, nH, N, hd], a view
        heads = qkv.new_empty(strided.shape)
        # per-row factors in float32 (at least); every large elementwise op stays in one dtype (mixed-dtype ops
        # make hidden converted copies on CPU). q and k are normalised on their way to head-major layout.
        norms = torch.linalg.vector_norm(strided[:2], dim=-1, keepdim=True).to(scale.dtype).clamp_min_(1e-12)
        factors = norms.reciprocal()
        factors[0].mul_(scale)  # = F.normalize(q) * scale, F.normalize(k)
        torch.mul(strided[:2], _row_factors(factors, heads[:2]), out=heads[:2])
        heads[2].copy_(strided[2])
        q, k, v = (t.view(b, g, n, -1) for t in heads)
        attn = torch.empty(b, g, n, n, dtype=qkv.dtype)
        # images per chunk: cache-sized logits, and few enough ops that late stages' small windows keep the
        # threads busy
        rows = max(1, min(b, SOFTMAX_CHUNK_BYTES // (4 * bias.numel())))
        if bias.dtype == qkv.dtype:
            tiled = bias.repeat(rows, 1, 1) if rows > 1 else bias
        else:
            scratch = bias.new_empty(rows, *bias.shape)
        for i in range(0, b, rows):
            j = min(b, i + rows)
            a = attn[i:j].view(-1, n, n)
            qi, ki = q[i:j].reshape(-1, n, q.shape[-1]), k[i:j].reshape(-1, n, k.shape[-1])
            if bias.dtype == qkv.dtype:
                torch.baddbmm(tiled[: a.shape[0]], qi, ki.transpose(-2, -1), out=a)
                torch.softmax(a, -1, out=a)
            else:  # low precision: bias and softmax in float32
                torch.bmm(qi, ki.transpose(-2, -1), out=a)
                logits = scratch[: j - i].copy_(attn[i:j]).add_(bias)
                attn[i:j].copy_(torch.softmax(logits, -1, out=logits))
        out = torch.matmul(attn, v).view(bw, nh, n, -1).transpose(1, 2).reshape(bw, n, -1)
    return out, heads, norms, attn


@cosine_window_attention.register_fake
def _(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    bw, n, c3 = qkv.shape
    nh, g = scale.shape[0], bias.shape[0]
    return (
        qkv.new_empty(bw, n, c3 // 3),
        qkv.new_empty(3, bw, nh, n, c3 // (3 * nh)),
        scale.new_empty(2, bw, nh, n, 1),
        qkv.new_empty(bw * nh // g, g, n, n),
    )


@torch.library.custom_op("simmim::cosine_window_attention_backward_v2", mutates_args=(), device_types="cpu")
def _cosine_window_attention_backward(
    grad_out: torch.Tensor, heads: torch.Tensor, scale: torch.Tensor, norms: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of qkv, the temperature and the bias (summed over images, in float32 at least)."""
    _, bw, nh, n, hd = heads.shape
    b, g = attn.shape[:2]
    with torch.autocast("cpu", enabled=False):
        q, k, v = (t.view(b, g, n, -1) for t in heads)
        grad_out = grad_out.to(heads.dtype).reshape(bw, n, nh, hd).transpose(1, 2).reshape(b, g, n, hd)
        grad_heads = torch.empty_like(heads)
        torch.matmul(attn.transpose(-2, -1), grad_out, out=grad_heads[2].view(b, g, n, hd))
        grad = torch.matmul(grad_out, v.transpose(-2, -1))
        _softmax_backward_(grad, attn)  # d logits
        # summed over groups by a matmul with ones: CPU sums over a leading dim are 2-20x slower for some shapes
        summed = grad[0] if b == 1 else torch.mm(grad.new_ones(1, b), grad.view(b, -1)).view(g, n, n)
        grad_bias = summed.to(_accumulation_dtype(grad.dtype))
        # x_hat = t * x / max(|x|, eps), t = scale for q and 1 for k: with a = <x_hat, d x_hat>,
        # dx = t / |x| * d x_hat - a / (t |x|) * x_hat (no projection term where the norm was clamped),
        # d scale = sum of a / scale over tokens.
        temps = (scale, torch.ones_like(scale))
        hat_grads = (torch.matmul(grad, k), torch.matmul(grad.transpose(-2, -1), q))
        for i in range(2):
            hat, hat_grad, norm, temp = heads[i], hat_grads[i].view(bw, nh, n, hd), norms[i], temps[i]
            a = torch.linalg.vecdot(hat, hat_grad).unsqueeze(-1).to(norm.dtype)
            if i == 0:
                grad_scale = (a.sum((0, 2)) / scale.view(-1, 1)).view_as(scale)
            coef = _row_factors(a.div_(temp * norm).masked_fill_(norm <= 1e-12, 0.0), hat)
            torch.mul(hat_grad, _row_factors(temp / norm, hat), out=grad_heads[i]).addcmul_(hat, coef, value=-1)
    return grad_heads.permute(1, 3, 0, 2, 4).reshape(bw, n, 3 * nh * hd), grad_scale, grad_bias


@_cosine_window_attention_backward.register_fake
def _(grad_out: torch.Tensor, heads: torch.Tensor, scale: torch.Tensor, norms: torch.Tensor, attn: torch.Tensor):
    _, bw, nh, n, hd = heads.shape
    grad_bias = attn.new_empty(attn.shape[1:], dtype=_accumulation_dtype(attn.dtype))
    return heads.new_empty(bw, n, 3 * nh * hd), torch.empty_like(scale), grad_bias


def _setup_context(ctx, inputs, output) -> None:
    _, scale, bias = inputs
    _, heads, norms, attn = output
    ctx.save_for_backward(heads, scale, norms, attn)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(heads, norms, attn)  # saved tensors, not results: no zero gradients made for them
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_):
    heads, scale, norms, attn = ctx.saved_tensors
    grad_qkv, grad_scale, grad_bias = _cosine_window_attention_backward(grad_out, heads, scale, norms, attn)
    return grad_qkv, grad_scale, grad_bias.to(ctx.bias_dtype)


cosine_window_attention.register_autograd(_backward, setup_context=_setup_context)
