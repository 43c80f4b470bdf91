"""Swin Transformer V2 (Liu et al., CVPR 2022): blocks, stages and the model, faithful to the
official code (same formulas, constants and state-dict keys: ``layers.{i}.blocks.{j}.attn.cpb_mlp.0.weight`` ...).

The rebuilt buffers (``relative_coords_table``, ``relative_position_index``, shift masks) are not saved: they follow
from the geometry, so a model built for another window or resolution loads the same weights.

Differences from the official code that do not change results for its inputs:
- activations are kept as (B, H, W, C) between blocks;
- inputs of any size are accepted: each stage pads to a multiple of the window *before* the cyclic shift and masks
  padded tokens out of attention, so no token attends across the wrap-around (timm issue #2438);
- attention (:mod:`simmim.models.attention`) is written out as the paper does, with a fused kernel one call beside it
  (:func:`simmim.kernels.fused_attention`: a hand-written CPU op, SDPA on accelerators);
- under bf16 autocast the position bias, the norms, the temperature and the softmax stay in float32 (timm and the
  official code run the bias MLP in bf16 under autocast);
- memory savers that change nothing else: per-block activation checkpointing (``use_checkpoint``) and sequential
  attention over chunks of (window, head) pairs (``attn_chunk_size``, paper section 3.4), which never materialises a
  [nW * nH, N, N] tensor (masks are kept as per-token region ids, see :class:`~simmim.models.layers.WindowMask`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from simmim.kernels import AttentionKernel, Linear
from simmim.models.attention import WindowAttention
from simmim.models.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    PatchMerging,
    WindowMask,
    clip_window,
    shifted_window_mask,
    to_pair,
    window_partition,
    window_reverse,
)

__all__ = ["BasicLayer", "SwinTransformerBlock", "SwinTransformerV2", "WindowAttention", "swin_layer_id"]


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
        self.input_resolution = to_pair(input_resolution)
        self.window_size, self.shift_size = clip_window(
            self.input_resolution, to_pair(window_size), to_pair(shift_size)
        )
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttention(
            dim,
            self.window_size,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            pretrained_window_size=pretrained_window_size,
            attn_chunk_size=attn_chunk_size,
        )
        self.norm1 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio), drop=drop)
        self.norm2 = norm_layer(dim)
        self._mask_cache: dict[tuple, WindowMask | None] = {}

    def attn_mask(self, h: int, w: int, device: torch.device) -> WindowMask | None:
        """The attention mask for an (h, w) input: shifted regions and padded keys (None when neither); cached per
        geometry (it depends on nothing else)."""
        key = (h, w, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(h, w, self.window_size, self.shift_size, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        shortcut = x
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):  # qkv casts anyway: move half
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ph, pw = (-h) % wh, (-w) % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))  # pad first, then roll (see shifted_window_mask)
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
        self.input_resolution = to_pair(input_resolution)
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                pretrained_window_size=pretrained_window_size,
                attn_chunk_size=attn_chunk_size,
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
        # one entry per stage; the official default [0, 0, 0, 0] also serves models of fewer stages (extra entries
        # must be 0: a non-zero one would be a window the model never uses)
        if len(pretrained_window_sizes) < len(depths) or any(pretrained_window_sizes[len(depths) :]):
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
        self.pretrained_window_sizes = tuple(pretrained_window_sizes[: self.num_layers])
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None,
        )
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
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
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

    # ---- timm-style interface -------------------------------------------------------------------------------------
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

    def set_attention_kernel(self, kernel: AttentionKernel | None) -> None:
        """Replace every block's attention core (:meth:`WindowAttention.attend`) with ``kernel(qkv, temperature,
        bias, dropout_p)`` -> [B*nW, N, C], for research and benchmarks (projections, position bias and masks stay
        as they are); None restores the default choice (:func:`simmim.kernels.fused_attention`)."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.kernel = kernel

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward --------------------------------------------------------------------------------------------------
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
