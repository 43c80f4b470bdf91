"""Mixup / CutMix on batches with label smoothing, and the soft-target cross-entropy, as used by the official
SwinV2 fine-tuning (timm ``Mixup`` in batch mode: mixup 0.8, cutmix 1.0, switch prob 0.5, smoothing 0.1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Mixup", "SoftTargetCrossEntropy", "smooth_one_hot"]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with ``smoothing`` spread evenly over all classes (rows sum to 1)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with probability targets: mean over the batch of ``-sum_c t_c log softmax(x)_c``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Mixup:
    """Mix each batch with its reverse: either mixup (``lam ~ Beta(mixup_alpha)``) or CutMix (a box of area
    ``1 - lam``, ``lam ~ Beta(cutmix_alpha)``, lam corrected to the clipped box), chosen with ``switch_prob``
    when both are on, applied with probability ``prob``. Returns mixed images and soft targets
    ``lam * y + (1 - lam) * y.flip(0)`` of smoothed one-hot labels."""

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        label_smoothing: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.prob = prob
        self.label_smoothing = label_smoothing
        self.rng = np.random.default_rng(seed)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _params(self) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch."""
        if not self.active or self.rng.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def _box(self, h: int, w: int, lam: float) -> tuple[int, int, int, int]:
        """A box of area about (1 - lam) h w centred uniformly, clipped to the image: (y0, y1, x0, x1)."""
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(self.rng.integers(0, h)), int(self.rng.integers(0, w))
        return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self._params()
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = self._box(images.shape[2], images.shape[3], lam)
                images = images.clone()
                images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[2] * images.shape[3])  # area actually pasted
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        y = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return images, y * lam + y.flip(0) * (1.0 - lam)
