"""Running SimMIM on images for looking: reconstructions in viewable pixels, per-patch losses.

Predictions live in the model's target space: ImageNet-normalised pixels, or, with ``NORM_TARGET``, pixels
normalised by the mean/std of their 47-px neighbourhood (official SwinV2 SimMIM config). To make them viewable we
undo the local normalisation with the image's own local statistics, then undo the ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simmim.masking import MaskGenerator
from simmim.models.simmim import SimMIM
from simmim.models.targets import masked_l1, norm_targets, upsample_mask

__all__ = ["Reconstructions", "denormalize", "fixed_masks", "reconstruct", "patch_loss_map", "ROWS"]

ROWS = ("original", "masked", "prediction", "pasted")
MASK_GREY = 0.5  # masked pixels in the "masked" row


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of ``(x - mean) / std`` per channel on [B, 3, H, W], clipped to the viewable range [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0.0, 1.0)


def fixed_masks(
    n: int,
    img_size: int,
    model_patch_size: int = 4,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> torch.Tensor:
    """``n`` SimMIM masks [n, img/p, img/p] (1 = masked) drawn from one generator seeded with ``seed``."""
    gen = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))


@dataclass
class Reconstructions:
    """Viewable images [B, 3, H, W] in [0, 1], the pixel mask, and losses in the model's target space."""

    original: torch.Tensor
    masked: torch.Tensor
    prediction: torch.Tensor  # the model's output everywhere, visible pixels included
    pasted: torch.Tensor  # prediction on masked pixels, original on visible ones
    pixel_mask: torch.Tensor  # [B, 1, H, W], 1 = masked
    pixel_l1: torch.Tensor  # [B, H, W] |target - prediction| averaged over channels
    loss: torch.Tensor  # [B] masked L1 per image, as in training
    norm_target: bool
    norm_target_patch_size: int

    @property
    def target_note(self) -> str:
        """One line saying which space the prediction was shown in."""
        if self.norm_target:
            return f"NORM_TARGET: prediction un-normalised with local mean/std ({self.norm_target_patch_size} px)"
        return "target: the normalised input pixels"


@torch.no_grad()
def reconstruct(
    model: SimMIM,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> Reconstructions:
    """Run ``model`` on normalised ``images`` [B, 3, H, W] with ``masks`` [B, H/p, W/p] (generated from
    ``seed``, ``mask_patch_size``, ``mask_ratio`` when None) and return viewable results.

    Runs in eval mode without autocast (the caller's mode is restored), so it is safe inside a bf16 run.
    """
    if images.ndim != 4 or images.shape[1] != model.in_chans:
        raise ValueError(f"images must be [B, {model.in_chans}, H, W], got {tuple(images.shape)}")
    if masks is None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"masks can only be generated for square images, got {tuple(images.shape[2:])}")
        masks = fixed_masks(len(images), images.shape[2], model.patch_size, mask_patch_size, mask_ratio, seed)
    param = next(model.parameters())
    device = param.device
    x = images.to(device, torch.float32)
    masks = masks.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            rec = model.reconstruct(x.to(param.dtype), masks).float()
    finally:
        model.train(was_training)
    pixel_mask = upsample_mask(masks, model.patch_size).float()[..., : x.shape[2], : x.shape[3]]
    if model.norm_target:
        target, local_mean, local_std = norm_targets(x, model.norm_target_patch_size, return_stats=True)
        rec_input = rec * local_std + local_mean  # back to the ImageNet-normalised input space
    else:
        target, rec_input = x, rec
    original = denormalize(x, mean, std)
    prediction = denormalize(rec_input, mean, std)
    return Reconstructions(
        original=original.cpu(),
        masked=(original * (1 - pixel_mask) + MASK_GREY * pixel_mask).cpu(),
        prediction=prediction.cpu(),
        pasted=torch.where(pixel_mask.bool(), prediction, original).cpu(),
        pixel_mask=pixel_mask.cpu(),
        pixel_l1=(target - rec).abs().mean(1).cpu(),
        loss=masked_l1(target, rec, pixel_mask, per_sample=True).cpu(),
        norm_target=model.norm_target,
        norm_target_patch_size=model.norm_target_patch_size,
    )


def patch_loss_map(recs: Reconstructions, patch_size: int) -> torch.Tensor:
    """Mean per-pixel L1 in each ``patch_size`` square over masked squares, NaN over visible ones:
    [B, H/patch, W/patch]. Use the mask patch size to get one value per masked block."""
    h, w = recs.pixel_l1.shape[1:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")
    loss = F.avg_pool2d(recs.pixel_l1.unsqueeze(1), patch_size).squeeze(1)
    masked = F.avg_pool2d(recs.pixel_mask, patch_size).squeeze(1) > 0.5
    return torch.where(masked, loss, torch.full_like(loss, float("nan")))
