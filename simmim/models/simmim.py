"""SimMIM (Xie et al., CVPR 2022) on a SwinV2 encoder: mask token, one-layer pixel head, masked L1 loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from simmim.kernels import PatchConv2d
from simmim.models.registry import MODEL_CONFIGS, check_model_name
from simmim.models.swinv2 import SwinTransformerV2
from simmim.models.targets import masked_l1, norm_targets, upsample_mask

__all__ = ["SwinTransformerV2ForSimMIM", "SimMIM", "build_simmim"]


class SwinTransformerV2ForSimMIM(SwinTransformerV2):
    """The SwinV2 encoder with a learned ``mask_token`` blended in after patch embedding; no classifier."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W], mask [B, H/p, W/p] (1 = masked) -> feature map [B, C, H/32, W/32]."""
        x = self.patch_embed(x)
        if mask.shape != x.shape[:3]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:3])}")
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = self.forward_stages(self.pos_embed(x))
        return x.permute(0, 3, 1, 2)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}


class SimMIM(nn.Module):
    """Encoder + one-layer head (1x1 conv to stride^2 * 3 channels, PixelShuffle) predicting raw pixels.

    ``model(images, mask)`` returns the loss; ``model.reconstruct(images, mask)`` the predicted pixels (in
    target space: normalised images, or locally normalised ones when ``norm_target`` is on).
    """

    def __init__(
        self,
        encoder: SwinTransformerV2ForSimMIM,
        encoder_stride: int | None = None,
        norm_target: bool = False,
        norm_target_patch_size: int = 47,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride or encoder.patch_size * 2 ** (encoder.num_layers - 1)
        self.in_chans = encoder.patch_embed.in_chans
        self.patch_size = encoder.patch_size
        self.norm_target = norm_target
        self.norm_target_patch_size = norm_target_patch_size
        self.decoder = nn.Sequential(
            PatchConv2d(encoder.num_features, self.encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels [B, 3, H, W] for images ``x`` with patch mask ``mask``."""
        rec = self.decoder(self.encoder(x, mask))
        return rec[..., : x.shape[2], : x.shape[3]]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return norm_targets(x, self.norm_target_patch_size) if self.norm_target else x

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rec = self.reconstruct(x, mask)
        # target and loss outside autocast, in float32 at least (float64 inputs stay float64)
        with torch.autocast(x.device.type, enabled=False):
            return masked_l1(self.target(x), rec, upsample_mask(mask, self.patch_size))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay_keywords()}


def build_simmim(
    model: str = "swinv2_base",
    norm_target: bool = False,
    norm_target_patch_size: int = 47,
    **overrides: Any,
) -> SimMIM:
    """A SimMIM model over a named SwinV2 configuration, e.g. ``build_simmim("swinv2_base", img_size=192,
    window_size=12)``."""
    check_model_name(model)
    encoder = SwinTransformerV2ForSimMIM(**{**MODEL_CONFIGS[model], **overrides})
    return SimMIM(encoder, norm_target=norm_target, norm_target_patch_size=norm_target_patch_size)
