"""The building blocks of SwinV2 around its attention: stochastic depth, MLP, patch embedding and merging, the
Log-CPB coordinate tables (paper eq. 4), window partitioning, the shifted-window mask and the effective-window rule.

Linear layers are :class:`simmim.kernels.Linear` modules (``nn.Linear`` subclasses with a faster float32 CPU product),
called as modules so that hooks and wrappers see them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simmim.kernels import Linear, PatchConv2d

__all__ = [
    "MASK_VALUE",
    "PAD_MASK_VALUE",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "WindowMask",
    "clip_window",
    "relative_coords_table",
    "relative_position_index",
    "shifted_window_mask",
    "to_pair",
    "window_partition",
    "window_reverse",
]

MASK_VALUE = -100.0  # the official shifted-window mask value (not -inf)
PAD_MASK_VALUE = -1e4  # padded keys: far below any cosine logit (|logit| <= 100 + 16)


def to_pair(x: int | Sequence[int]) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` -> ``(7, 7)``."""
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {x}")
    return x  # type: ignore[return-value]


def clip_window(
    resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, shift) a block uses on a stage of ``resolution`` tokens. The official rule, in one place: a stage no
    larger than the window gets one unshifted window covering it."""
    if min(resolution) <= min(window):
        return (min(resolution),) * 2, (0, 0)  # type: ignore[return-value]
    return window, shift


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
    """fc1, GELU, dropout, fc2, dropout (official keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Image to patch tokens: a strided convolution (:class:`PatchConv2d`), then LayerNorm; returns [B, H/p, W/p, C]
    (inputs of any size are padded to a multiple of the patch)."""

    def __init__(
        self,
        img_size: int | Sequence[int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.img_size = to_pair(img_size)
        self.patch_size = to_pair(patch_size)
        self.patches_resolution = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = PatchConv2d(in_chans, embed_dim, kernel_size=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        ph, pw = (-x.shape[2]) % self.patch_size[0], (-x.shape[3]) % self.patch_size[1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbours concatenated, reduced 4C -> 2C, *then* normalised (odd sizes padded)."""

    def __init__(self, input_resolution: Sequence[int], dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.input_resolution = to_pair(input_resolution)
        self.dim = dim
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x))


# ---- Log-spaced continuous position bias (paper section 3.3) ---------------------------------------------------
def relative_coords_table(window: tuple[int, int], pretrained_window: tuple[int, int]) -> torch.Tensor:
    """Log-spaced relative coordinates (eq. 4), [1, 2Wh-1, 2Ww-1, 2], in float32 as officially: offsets scaled to
    [-8, 8] by the pretrained window (or this one), then sign(x) * log2(1 + |x|) / log2(8)."""
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


# ---- windows --------------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, wh * ww, C], windows image-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """[B * nW, wh * ww, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class WindowMask:
    """Additive attention mask of one block geometry, kept as per-token ids: ``MASK_VALUE`` between tokens of
    different shifted regions, ``PAD_MASK_VALUE`` on padded keys. :meth:`dense` builds [nW, N, N] (cached for all
    windows) or the rows of a few windows only (sequential attention never holds the whole mask)."""

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


def shifted_window_mask(
    h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> WindowMask | None:
    """The mask of a block on (h, w) tokens: shifted regions (the official 9 region ids, on the padded grid: pad
    first, then roll, so no token attends across the wrap-around) and padded keys; None when neither."""
    (wh, ww), (sh, sw) = window, shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    padded = hp != h or wp != w
    if not (sh or sw or padded):
        return None
    region = pad_keys = None
    if sh or sw:
        img = torch.zeros(hp, wp, dtype=torch.int8)
        cnt = 0
        for hs in ((0, -wh), (-wh, -sh), (-sh, None)) if sh else ((0, None),):
            for ws in ((0, -ww), (-ww, -sw), (-sw, None)) if sw else ((0, None),):
                img[slice(*hs), slice(*ws)] = cnt
                cnt += 1
        region = window_partition(img[None, :, :, None], window).squeeze(-1).to(device)
    if padded:
        valid = torch.zeros(hp, wp, dtype=torch.bool)
        valid[:h, :w] = True
        valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))
        pad_keys = ~window_partition(valid[None, :, :, None], window).squeeze(-1).to(device)
    return WindowMask(region, pad_keys)
