"""SimMIM's random block masking (geometry only): which model patches of an image are masked."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MaskGenerator"]


class MaskGenerator:
    """Random square blocks of ``mask_patch_size`` px, expressed on the model's ``model_patch_size`` grid.

    As in the official code: the image is cut into (input_size / mask_patch_size)^2 cells, exactly
    ceil(cells * mask_ratio) of them are masked, and each cell is repeated to the patch grid, giving an
    int mask of shape (input_size / model_patch_size,)*2 with 1 = masked.
    """

    def __init__(
        self,
        input_size: int = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        if input_size % mask_patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by mask_patch_size {mask_patch_size}: "
                f"choose an image size that is a multiple of {mask_patch_size}, or another mask_patch_size"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not divisible by the model's patch_size {model_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """One mask, [input/model_patch, input/model_patch] int64; pass a seeded ``rng`` for reproducibility."""
        rng = np.random.default_rng() if rng is None else rng
        mask = np.zeros(self.token_count, dtype=np.int64)
        mask[rng.permutation(self.token_count)[: self.mask_count]] = 1
        mask = mask.reshape(self.rand_size, self.rand_size)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )
