"""Swin Transformer V2 (Liu et al., CVPR 2022), faithful to the official code, with a fast and lean path.

State-dict keys are the official ones (``layers.{i}.blocks.{j}.attn.cpb_mlp.0.weight`` ...). The rebuilt
buffers (``relative_coords_table``, ``relative_position_index``, ``attn_mask``) are not saved: they follow
from the geometry, so a model built for another window or resolution loads the same weights.

Differences from the official code that do not change results for its inputs:
- activations are kept as (B, H, W, C) between blocks;
- inputs of any size are accepted: each stage pads to a multiple of the window *before* the cyclic shift and
  masks padded tokens out of attention, so no token attends across the wrap-around (timm issue #2438);
- attention is fused (the temperature is folded into q, the position bias and shift mask form one additive
  mask); on CPU a hand-written op with its own backward (:func:`cosine_window_attention`) replaces the autograd
  graph, elsewhere ``scaled_dot_product_attention``;
- under bf16 autocast the position bias, the norms, the temperature and the softmax stay in float32 (timm and
  the official code run the bias MLP in bf16 under autocast);
- memory savers that change nothing else: per-block activation checkpointing (``use_checkpoint``) and
  sequential attention over chunks of (window, head) pairs (``attn_chunk_size``), which never materialises a
  [nW * nH, N, N] tensor (masks are kept as per-token region ids, see :class:`WindowMask`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from simmim import runtime
from simmim.models.ops import linear

__all__ = [
    "SwinTransformerV2",
    "WindowAttention",
    "SwinTransformerBlock",
    "PatchMerging",
    "PatchEmbed",
    "WindowMask",
    "MODEL_CONFIGS",
    "compile_model",
    "create_model",
]

LOG_MAX_SCALE = math.log(100.0)  # logit_scale is clamped at log(1/0.01): temperature at most 100
MASK_VALUE = -100.0  # the official shifted-window mask value (not -inf)
_SOFTMAX_CHUNK_BYTES = 4 << 20  # CPU attention: float32 logits handled a few images at a time (fits the L3 cache)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
PAD_MASK_VALUE = -1e4  # padded keys: far below any cosine logit (|logit| <= 100 + 16)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {x}")
    return x  # type: ignore[return-value]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(linear(x, self.fc1.weight, self.fc1.bias)))
        return self.drop(linear(x, self.fc2.weight, self.fc2.bias))


def relative_coords_table(window: tuple[int, int], pretrained_window: tuple[int, int]) -> torch.Tensor:
    """Log-spaced relative coordinates (paper eq. 4), [1, 2Wh-1, 2Ww-1, 2], computed in float32 as officially."""
    rh = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32)
    rw = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rh, rw, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    norm = pretrained_window if pretrained_window[0] > 0 else window
    table[..., 0] /= max(norm[0] - 1, 1)
    table[..., 1] /= max(norm[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Index of each (query, key) pair of a window into the flattened coordinate table, [N, N]."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + window[0] - 1) * (2 * window[1] - 1) + (rel[..., 1] + window[1] - 1)


class WindowAttention(nn.Module):
    """Scaled cosine window attention with a log-spaced continuous position bias (paper eqs. 2-4).

    ``attn_chunk_size`` > 0 computes attention sequentially over chunks of whole windows, about
    ``attn_chunk_size`` (window, head) pairs (at least one window), each chunk recomputed in the backward pass,
    so attention memory is bounded by one chunk (paper section 3.4). Results are unchanged.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Sequence[int],
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int | Sequence[int] = 0,
        attn_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = _pair(window_size)
        self.pretrained_window_size = _pair(pretrained_window_size)
        self.num_heads = num_heads
        self.attn_chunk_size = attn_chunk_size
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        table = relative_coords_table(self.window_size, self.pretrained_window_size)
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def position_bias(self) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered to [nH, N, N]; cached while the weights stay unchanged."""
        params = tuple(self.cpb_mlp.parameters())
        cacheable = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
        if torch.compiler.is_compiling():  # a compiled graph computes it once per call anyway, data_ptr untraceable
            return self._position_bias()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        key += (self.relative_coords_table.data_ptr(), self.relative_coords_table.dtype)
        if cacheable and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        bias = self._position_bias()
        self._bias_cache = (key, bias.detach()) if cacheable else None
        return bias

    def _position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        fc1, fc2 = self.cpb_mlp[0], self.cpb_mlp[2]
        with torch.autocast(self.relative_coords_table.device.type, enabled=False):  # bias values up to 16: fp32
            # cpb_mlp written out, for speed on CPU: fc1's weight as a row-major [2, 512] (its gradient is then a
            # [2, T] x [T, 512] product; as [512, 2] it is a skinny one, ~10x slower), and fc2 computed
            # head-major, [nH, T], so the gather reads contiguous rows and its backward is a row-wise index_add_
            # (indexing rows of [T, nH] costs a serial scatter-add)
            hidden = torch.addmm(fc1.bias, self.relative_coords_table.view(-1, 2), fc1.weight.t().contiguous())
            table = 16 * torch.sigmoid(torch.mm(fc2.weight, hidden.relu_().t()))
            return table.index_select(1, self.relative_position_index.view(-1)).view(-1, n, n)

    def forward(self, x: torch.Tensor, mask: WindowMask | torch.Tensor | None = None) -> torch.Tensor:
        """x: [B*nW, N, C] windows of a batch, image-major; mask: a :class:`WindowMask`, an additive [nW, N, N]
        tensor (shift and padding), or None."""
        bw, n, _ = x.shape
        if isinstance(mask, torch.Tensor):
            mask = WindowMask(dense=mask)
        nw = mask.num_windows if mask is not None else 1
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = linear(x, self.qkv.weight, bias)
        # Cosine similarity with a learnt temperature (eq. 2), clamped at 100 and computed in float32 (at least).
        scale = torch.clamp(_upcast(self.logit_scale), max=LOG_MAX_SCALE).exp()
        pos_bias = self.position_bias()  # [nH, N, N]
        p = self.attn_drop if self.training else 0.0
        if self.attn_chunk_size <= 0:
            out = _attention(qkv, scale, _window_bias(pos_bias, mask, None), p)
        else:
            # Sequential attention (paper section 3.4): whole windows, about attn_chunk_size (window, head) pairs at a
            # time, each chunk recomputed in the backward pass; no [nW*nH, N, N] tensor of the full batch exists.
            step = max(1, self.attn_chunk_size // self.num_heads)
            recompute = torch.is_grad_enabled() and (qkv.requires_grad or pos_bias.requires_grad)
            out = []
            for s in range(0, bw, step):
                args = (qkv[s : s + step], scale, pos_bias, mask, torch.arange(s, min(s + step, bw)) % nw, p)
                if recompute:
                    out.append(torch.utils.checkpoint.checkpoint(_chunk_attention, *args, use_reentrant=False))
                else:
                    out.append(_chunk_attention(*args))
            out = torch.cat(out)
        return self.proj_drop(linear(out, self.proj.weight, self.proj.bias))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, "
            f"pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}"
        )


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 (float32 and float64 stay)."""
    return t.float() if t.dtype in _HALF_DTYPES else t


def _window_bias(pos_bias: torch.Tensor, mask: WindowMask | None, windows: torch.Tensor | None) -> torch.Tensor:
    """Position bias [nH, N, N] plus the mask of ``windows`` (indices within an image; None: all of the mask's):
    [windows * nH, N, N]; without a mask the bias itself, shared by every window."""
    if mask is None:
        return pos_bias
    dense = mask.dense(None if windows is None else windows.to(pos_bias.device))
    return (pos_bias + dense[:, None]).flatten(0, 1)


def _chunk_attention(qkv, scale, pos_bias, mask: WindowMask | None, windows: torch.Tensor, p: float):
    """Attention of a slice of whole windows (``windows``: their indices within an image)."""
    return _attention(qkv, scale, _window_bias(pos_bias, mask, windows), p)


def _attention(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, p: float) -> torch.Tensor:
    """Scaled cosine attention of windows: qkv [B*nW, N, 3C], temperature [nH, 1, 1], bias [G*nH, N, N] for each
    group of G consecutive windows (G = nW: one per image; G = 1: shared by all) -> [B*nW, N, C]. On CPU without
    attention dropout the hand-written ``simmim::cosine_window_attention`` op (opaque to ``torch.compile``, which
    fuses the rest of the block around it); otherwise normalisation plus ``scaled_dot_product_attention``."""
    if qkv.device.type == "cpu" and p == 0.0 and runtime.kernels_enabled() and runtime.fast_paths().cpu_attention:
        return cosine_window_attention(qkv, scale, bias)[0]
    return _sdpa_attention(qkv, scale, bias, p)


def _sdpa_attention(qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, p: float) -> torch.Tensor:
    bw, n, c3 = qkv.shape
    nh, g = scale.shape[0], bias.shape[0]
    q, k, v = qkv.view(bw, n, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B*nW, nH, N, hd]
    q = (F.normalize(_upcast(q), dim=-1) * scale).to(v.dtype)
    k = F.normalize(_upcast(k), dim=-1).to(v.dtype)
    # One group of G windows per row, its (window, head) pairs along dim 1, so the [G*nH, N, N] bias broadcasts.
    q, k, v = (t.reshape(bw * nh // g, g, n, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(v.dtype), dropout_p=p, scale=1.0)
    return out.view(bw, nh, n, -1).transpose(1, 2).reshape(bw, n, c3 // 3)


# Scaled cosine window attention on CPU as a custom op with a hand-written backward.
#
# Why: PyTorch's CPU SDPA takes its math path for a bias that needs a gradient (upcasting bfloat16), and the
# autograd graph of the plain formulation makes many passes over the (windows, heads, N, N) tensors, several of
# them strided. Here q, k, v are copied once to contiguous head-major layout, q and k normalised on the way (the
# temperature folded into q, the factors computed in float32), logits come from one matmul per chunk, and bias add
# and softmax run in float32 on a few images' logits at a time (cache-sized): under bf16 autocast the matmuls'
# inputs and outputs are bfloat16 as in SDPA, the position bias (up to 16) and the softmax are not. Saved for
# backward: normalised q, k, v, the norms, the probabilities. As a ``torch.library`` op it stays one opaque
# kernel under ``torch.compile`` (no graph break).


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_factors(factors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row factors [..., 1] for an elementwise op with ``rows`` [..., hd], in its dtype; written out at full
    size for short half-precision rows, which the broadcast kernels do not vectorise (hd 24: ~8x slower)."""
    factors = factors.to(rows.dtype)
    # ATen's half-precision broadcast kernels run a scalar loop over rows shorter than a vector register
    if rows.dtype in _HALF_DTYPES and rows.shape[-1] < runtime.fast_paths().lanes(rows.element_size()):
        return factors.expand(rows.shape).contiguous()
    return factors


def _softmax_backward_(grad: torch.Tensor, probs: torch.Tensor) -> None:
    """grad <- the gradient of the logits, in place. Short half-precision rows (windows under 32 tokens: 4-7x
    slower than float32) go through float32 in cache-sized chunks."""
    n = probs.shape[-1]
    if probs.dtype not in _HALF_DTYPES or n >= runtime.fast_paths().lanes(probs.element_size()):
        torch._softmax_backward_data(grad, probs, -1, probs.dtype, grad_input=grad)
        return
    grad, probs = grad.view(-1, n), probs.view(-1, n)
    rows = max(1, min(grad.shape[0], _SOFTMAX_CHUNK_BYTES // (8 * n)))
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
    """qkv [B*nW, N, 3C], temperature [nH, 1, 1], bias [G*nH, N, N] (see :func:`_attention`) -> (out [B*nW, N, C],
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
        rows = max(1, min(b, _SOFTMAX_CHUNK_BYTES // (4 * bias.numel())))
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


class WindowMask:
    """Additive attention mask of one block geometry, kept as per-token ids: -100 between tokens of different
    shifted regions (official value, not -inf), ``PAD_MASK_VALUE`` on padded keys. :meth:`dense` builds
    [nW, N, N] (cached for all windows) or the rows of a few windows only (sequential attention)."""

    def __init__(
        self,
        region: torch.Tensor | None = None,
        pad_keys: torch.Tensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> None:
        self.region, self.pad_keys, self._dense = region, pad_keys, dense
        ref = next(t for t in (region, pad_keys, dense) if t is not None)
        self.num_windows = ref.shape[0]

    def dense(self, windows: torch.Tensor | None = None) -> torch.Tensor:
        """[nW, N, N] float32, or [len(windows), N, N] for a window index tensor."""
        if windows is None:
            if self._dense is None:
                self._dense = self._build(None)
            return self._dense
        return self._dense[windows] if self._dense is not None else self._build(windows)

    def _build(self, windows: torch.Tensor | None) -> torch.Tensor:
        pick = (lambda t: t) if windows is None else (lambda t: t[windows])
        ref = self.region if self.region is not None else self.pad_keys
        nw, n = pick(ref).shape
        mask = torch.zeros(nw, n, n, device=ref.device)
        if self.region is not None:
            region = pick(self.region)
            mask.masked_fill_(region.unsqueeze(1) != region.unsqueeze(2), MASK_VALUE)
        if self.pad_keys is not None:
            mask.masked_fill_(pick(self.pad_keys).unsqueeze(1), PAD_MASK_VALUE)
        return mask


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, wh * ww, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """[B * nW, wh * ww, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention and MLP with res-post-norm (paper eq. 1): x + norm(f(x))."""

    def __init__(
        self,
        dim: int,
        input_resolution: Sequence[int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: int | Sequence[int] = 0,
        attn_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = _pair(input_resolution)
        window = _pair(window_size)
        shift = _pair(shift_size)
        # A stage no larger than the window gets one unshifted window covering it (official rule).
        if min(self.input_resolution) <= min(window):
            shift = (0, 0)
            window = (min(self.input_resolution),) * 2
        self.window_size = window
        self.shift_size = shift
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttention(
            dim, window, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size, attn_chunk_size
        )
        self.norm1 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = norm_layer(dim)
        self._mask_cache: dict[tuple, WindowMask | None] = {}

    def attn_mask(self, h: int, w: int, device: torch.device) -> WindowMask | None:
        """The attention mask for an (h, w) input: shifted regions and padded keys (None when neither)."""
        key = (h, w, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._build_mask(h, w, device)
        return self._mask_cache[key]

    def _build_mask(self, h: int, w: int, device: torch.device) -> WindowMask | None:
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
        padded = hp != h or wp != w
        if not (sh or sw or padded):
            return None
        region = pad_keys = None
        if sh or sw:
            # Region ids as in the official code, on the padded grid (pad first, then roll).
            img = torch.zeros(hp, wp, dtype=torch.int8)
            cnt = 0
            for hs in ((0, -wh), (-wh, -sh), (-sh, None)) if sh else ((0, None),):
                for ws in ((0, -ww), (-ww, -sw), (-sw, None)) if sw else ((0, None),):
                    img[slice(*hs), slice(*ws)] = cnt
                    cnt += 1
            region = window_partition(img[None, :, :, None], self.window_size).squeeze(-1).to(device)
        if padded:
            valid = torch.zeros(hp, wp, dtype=torch.bool)
            valid[:h, :w] = True
            valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))
            pad_keys = ~window_partition(valid[None, :, :, None], self.window_size).squeeze(-1).to(device)
        return WindowMask(region, pad_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        shortcut = x
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):  # qkv casts anyway: move half
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ph, pw = (-h) % wh, (-w) % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), self.attn_mask(h, w, x.device))
        x = window_reverse(windows, self.window_size, hp, wp)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if ph or pw:
            x = x[:, :h, :w].contiguous()
        x = shortcut + self.drop_path(self.norm1(x))
        return x + self.drop_path(self.norm2(self.mlp(x)))

    def _init_respostnorm(self) -> None:
        for norm in (self.norm1, self.norm2):
            nn.init.constant_(norm.weight, 0)
            nn.init.constant_(norm.bias, 0)


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbours concatenated, reduced 4C -> 2C, *then* normalised."""

    def __init__(self, input_resolution: Sequence[int], dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.input_resolution = _pair(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(linear(x, self.reduction.weight))


class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided convolution, then LayerNorm; returns [B, H/p, W/p, C]."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        ph, pw = (-x.shape[2]) % self.patch_size[0], (-x.shape[3]) % self.patch_size[1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating unshifted / shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: Sequence[int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        downsample: type[nn.Module] | None = None,
        use_checkpoint: bool = False,
        pretrained_window_size: int | Sequence[int] = 0,
        attn_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = _pair(input_resolution)
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                mlp_ratio,
                qkv_bias,
                drop,
                attn_drop,
                dpr[i],
                norm_layer,
                pretrained_window_size,
                attn_chunk_size,
            )
            for i in range(depth)
        )
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.downsample(x) if self.downsample is not None else x

    def _init_respostnorm(self) -> None:
        for blk in self.blocks:
            blk._init_respostnorm()


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 with the official constructor arguments and state-dict keys.

    ``attn_chunk_size`` > 0 turns on sequential self-attention; ``use_checkpoint`` turns on per-block
    activation checkpointing. Both change memory only, not results.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
        attn_chunk_size: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"SwinTransformerV2 got unknown arguments: {sorted(kwargs)}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if len(pretrained_window_sizes) != len(depths):
            raise ValueError(
                f"pretrained_window_sizes {list(pretrained_window_sizes)} needs one entry per stage ({len(depths)})"
            )
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.depths = tuple(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.window_size = window_size
        self.pretrained_window_sizes = tuple(pretrained_window_sizes)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.img_size = self.patch_embed.img_size
        self.patch_size = patch_size
        res = self.patch_embed.patches_resolution
        if min(res) < 2 ** (self.num_layers - 1):
            raise ValueError(
                f"img_size {img_size} with patch_size {patch_size} is too small for {self.num_layers} stages: "
                f"needs at least {patch_size * 2 ** (self.num_layers - 1)} px"
            )
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, res[0], res[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            BasicLayer(
                dim=int(embed_dim * 2**i),
                input_resolution=(math.ceil(res[0] / 2**i), math.ceil(res[1] / 2**i)),
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer,
                downsample=PatchMerging if i < self.num_layers - 1 else None,
                use_checkpoint=use_checkpoint,
                pretrained_window_size=pretrained_window_sizes[i],
                attn_chunk_size=attn_chunk_size,
            )
            for i in range(self.num_layers)
        )
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for layer in self.layers:
            layer._init_respostnorm()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---- timm-style interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    @property
    def num_lr_layers(self) -> int:
        """Number of layer ids used by layer-wise lr decay: sum(depths) + 2."""
        return sum(self.depths) + 2

    def layer_id(self, name: str) -> int:
        """The official layer-wise lr decay rule (utils_simmim.get_swin_layer_id); name without prefix."""
        return swin_layer_id(name, self.depths)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^absolute_pos_embed|^patch_embed|^mask_token",
            "blocks": r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def set_attn_chunk_size(self, chunk: int) -> None:
        """Sequential self-attention: 0 computes all windows at once, k > 0 in chunks of whole windows of about
        k (window, head) pairs (at least one window)."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.attn_chunk_size = chunk

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward --------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding (+ absolute position embedding): [B, 3, H, W] -> [B, H/p, W/p, C]."""
        return self.pos_embed(self.patch_embed(x))

    def pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.ape:
            pe = self.absolute_pos_embed
            if pe.shape[1:3] != x.shape[1:3]:
                pe = F.interpolate(pe.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
            x = x + pe
        return self.pos_drop(x)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Stages and final norm on embedded tokens: [B, H/p, W/p, C] -> [B, H/32, W/32, num_features]."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> normalised features [B, H/32, W/32, num_features]."""
        return self.forward_stages(self.embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id for layer-wise lr decay, as in the official get_swin_layer_id."""
    if name.startswith("encoder."):
        name = name[len("encoder.") :]
    if name in ("mask_token", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths[: stage + 1])
    return sum(depths) + 1


# ---- named configurations ------------------------------------------------------------------------------
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # Paper sizes (Table 1 / official configs); H and G as in the paper's section 4.
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swinv2_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    "swinv2_giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128)),
    # Small models that train in minutes on a CPU at 32-96 px.
    "swinv2_micro": dict(embed_dim=48, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16), window_size=4),
    "swinv2_nano": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4),
}


def create_model(name: str, **overrides: Any) -> SwinTransformerV2:
    """Build a named configuration, e.g. ``create_model("swinv2_base", img_size=192, window_size=12)``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")
    return SwinTransformerV2(**{**MODEL_CONFIGS[name], **overrides})


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile`` in place (``nn.Module.compile``: state-dict keys stay unprefixed, so checkpoints do not
    change). The CPU attention stays one opaque op; inductor fuses the work around it."""
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"compile_mode={mode!r} is not a torch.compile mode; use one of {', '.join(modes)}")
    runtime.fast_paths()  # decided (and calibrated) eagerly, not inside a traced graph
    model.compile(mode=None if mode == "default" else mode)
    return model
