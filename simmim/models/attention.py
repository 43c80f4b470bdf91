"""Scaled cosine window attention with a log-spaced continuous position bias: SwinV2's attention (paper eqs. 2-4).

:meth:`WindowAttention.attend` writes the formula out as the paper does, with the fused kernel one call beside it
(:func:`simmim.kernels.fused_attention`: the hand-written CPU op, SDPA on accelerators); the projections are
:class:`simmim.kernels.Linear` modules called as modules, so hooks and adapter wrappers see ``qkv`` and ``proj``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from simmim.kernels import AttentionKernel, Linear, fused_attention, linear
from simmim.kernels.attention import upcast
from simmim.models.layers import WindowMask, relative_coords_table, relative_position_index, to_pair

__all__ = ["LOG_MAX_SCALE", "QKVLinear", "WindowAttention"]

LOG_MAX_SCALE = math.log(100.0)  # logit_scale is clamped at log(1/0.01): temperature at most 100


class QKVLinear(Linear):
    """The qkv projection: weight only in the state dict (official ``attn.qkv.weight``); the q and v biases are the
    attention's own parameters (``attn.q_bias``, ``attn.v_bias``) and come in as ``bias``, added in the product."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, bias)


class WindowAttention(nn.Module):
    """Scaled cosine window attention with a log-spaced continuous position bias (paper eqs. 2-4).

    ``attn_chunk_size`` > 0 computes attention sequentially over chunks of whole windows, about ``attn_chunk_size``
    (window, head) pairs (at least one window), each chunk recomputed in the backward pass, so attention memory is
    bounded by one chunk (paper section 3.4). Results are unchanged. ``kernel`` replaces the attention core (see
    :meth:`attend`; None: :func:`simmim.kernels.fused_attention` chooses).
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
        self.window_size = to_pair(window_size)
        self.pretrained_window_size = to_pair(pretrained_window_size)
        self.num_heads = num_heads
        self.attn_chunk_size = attn_chunk_size
        self.kernel: AttentionKernel | None = None
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(
            Linear(2, 512, bias=True), nn.ReLU(inplace=True), Linear(512, num_heads, bias=False)
        )
        table = relative_coords_table(self.window_size, self.pretrained_window_size)
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        # official layout: a bias-free qkv product, then q and v biases of their own (the key bias is always 0)
        self.qkv = QKVLinear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_memo: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None

    # ---- the terms of eq. 2 ---------------------------------------------------------------------------------------
    def temperature(self) -> torch.Tensor:
        """The per-head factor of the cosine similarity, exp(min(logit_scale, log 100)) [nH, 1, 1], in float32 at
        least (paper eq. 2's 1 / tau; init 10)."""
        return torch.clamp(upcast(self.logit_scale), max=LOG_MAX_SCALE).exp()

    def position_bias_table(self) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(relative_coords_table)): the Log-CPB bias of every relative offset (eq. 4; the
        16 * sigmoid bound is the official code's), [nH, 2Wh-1, 2Ww-1], outside autocast (values up to 16)."""
        coords = self.relative_coords_table  # [1, 2Wh-1, 2Ww-1, 2]
        with torch.autocast(coords.device.type, enabled=False):
            bias = 16 * torch.sigmoid(self.cpb_mlp(coords.view(-1, 2)))  # [T, nH], one row per offset
            return bias.t().reshape(-1, *coords.shape[1:3])

    def position_bias(self) -> torch.Tensor:
        """The table gathered for every (query, key) pair of a window, [nH, N, N]. Memoised on CPU while no gradient
        is needed (batch-1 inference of SwinV2-T: ~15%), keyed on the values it is computed from."""
        n = self.window_size[0] * self.window_size[1]
        inputs = (self.relative_coords_table, *self.cpb_mlp.parameters())  # the index follows from the window
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if grad or inputs[0].device.type != "cpu" or torch.compiler.is_compiling():
            return self._gather(self.position_bias_table(), n)
        memo = self._bias_memo
        if memo is not None and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(memo[0], inputs)
        ):
            return memo[1]
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable outside inference mode too
            bias = self._gather(self.position_bias_table(), n)
            self._bias_memo = (tuple(t.clone() for t in inputs), bias)
        return bias

    def _gather(self, table: torch.Tensor, n: int) -> torch.Tensor:
        # head-major, so the gather reads contiguous rows and its backward is a row-wise index_add_ (indexing rows of
        # a [T, nH] table costs a serial scatter-add)
        return table.flatten(1).index_select(1, self.relative_position_index.view(-1)).view(-1, n, n)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: WindowMask | torch.Tensor | None = None) -> torch.Tensor:
        """x: [B*nW, N, C] windows of a batch, image-major; mask: a :class:`WindowMask`, an additive [nW, N, N]
        tensor (shift and padding), or None."""
        if isinstance(mask, torch.Tensor):
            mask = WindowMask(dense=mask)
        bias = None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        if isinstance(self.qkv, QKVLinear):  # the bias fused into the product, as officially
            qkv = self.qkv(x, bias)
        else:  # a replaced or wrapped projection (LoRA, quantised, ...) is called on x alone, the bias added after
            qkv = self.qkv(x)
            qkv = qkv if bias is None else qkv + bias.to(qkv.dtype)
        scale, pos_bias = self.temperature(), self.position_bias()
        if self.attn_chunk_size <= 0:
            out = self.attend(qkv, scale, _window_bias(pos_bias, mask))
        else:
            out = self._attend_sequentially(qkv, scale, pos_bias, mask)
        return self.proj_drop(self.proj(out))

    def attend(self, qkv: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(cos(q, k) * scale + bias) v (eq. 2) for projected windows ``qkv`` [B*nW, N, 3C] -> [B*nW, N, C];
        ``scale``: :meth:`temperature`; ``bias``: the position bias plus the windows' masks, [G*nH, N, N] for each
        group of G consecutive windows. The fused kernel where one runs, else the formula as written."""
        p = self.attn_drop.p if self.training else 0.0
        kernel = self.kernel or fused_attention(qkv.device, p)
        if kernel is not None:
            return kernel(qkv, scale, bias, p)
        bw, n, _ = qkv.shape
        q, k, v = qkv.view(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B*nW, nH, N, hd]
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale  # cos(q, k) / tau
        attn = attn.reshape(-1, bias.shape[0], n, n) + bias  # + B_ij (eq. 3), + shift and padding mask
        attn = self.attn_drop(attn.softmax(-1)).view(bw, self.num_heads, n, n)
        return (attn.to(v.dtype) @ v).transpose(1, 2).reshape(bw, n, -1)

    def _attend_sequentially(
        self, qkv: torch.Tensor, scale: torch.Tensor, pos_bias: torch.Tensor, mask: WindowMask | None
    ) -> torch.Tensor:
        """Whole windows, about attn_chunk_size (window, head) pairs at a time, each chunk recomputed in the
        backward pass: no [nW * nH, N, N] tensor of the full batch exists (paper section 3.4)."""
        bw, nw = qkv.shape[0], mask.num_windows if mask is not None else 1
        step = max(1, self.attn_chunk_size // self.num_heads)
        recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, scale, pos_bias))
        out = []
        for s in range(0, bw, step):
            args = (qkv[s : s + step], scale, pos_bias, mask, torch.arange(s, min(s + step, bw)) % nw)
            if recompute:
                out.append(torch.utils.checkpoint.checkpoint(self._attend_chunk, *args, use_reentrant=False))
            else:
                out.append(self._attend_chunk(*args))
        return torch.cat(out)

    def _attend_chunk(self, qkv, scale, pos_bias, mask: WindowMask | None, windows: torch.Tensor) -> torch.Tensor:
        return self.attend(qkv, scale, _window_bias(pos_bias, mask, windows))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, "
            f"pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}"
        )


def _window_bias(pos_bias: torch.Tensor, mask: WindowMask | None, windows: torch.Tensor | None = None) -> torch.Tensor:
    """Position bias [nH, N, N] plus the mask of ``windows`` (indices within an image; None: all of the mask's):
    [windows * nH, N, N], one group per image; without a mask the bias itself, shared by every window."""
    if mask is None:
        return pos_bias
    dense = mask.dense(None if windows is None else windows.to(pos_bias.device))
    return (pos_bias + dense[:, None]).flatten(0, 1)
