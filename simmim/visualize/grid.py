"""Reconstruction grids as pictures (PIL: exact pixels, no resampling, cheap enough for a training callback)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simmim.models.simmim import SimMIM
from simmim.visualize.reconstruction import ROWS, Reconstructions, reconstruct

__all__ = ["grid_zoom", "make_grid", "save_reconstruction_grid"]

LABEL_W = 70  # row labels on the left
TITLE_H = 28  # two lines of title
CAPTION_H = 14  # per-image loss above each column
PAD = 2


def _font(size: int = 11) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _to_uint8(x: torch.Tensor, zoom: int) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H*zoom, W*zoom, 3] uint8, nearest-neighbour so pixels stay exact."""
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return arr.repeat(zoom, axis=0).repeat(zoom, axis=1)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` px (the grid's size never depends on its text)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid_zoom(img_size: int, min_tile: int = 96) -> int:
    """Integer upscaling so small images (e.g. 32-px Fashion-MNIST) stay readable: ceil(min_tile / size)."""
    return max(1, math.ceil(min_tile / img_size))


def make_grid(recs: Reconstructions, title: str = "", min_tile: int = 96) -> np.ndarray:
    """A uint8 [H, W, 3] picture: one column per image, rows original / masked / prediction / pasted.

    Layout: a two-line title band (``title`` and the mean masked L1; then which target space), a caption with
    each image's masked L1, row labels on the left. With tiles of ``th x tw`` = image size times
    :func:`grid_zoom`, the size is ``(TITLE_H + CAPTION_H + 4 * (th + PAD) + PAD, LABEL_W + B * (tw + PAD) + PAD)``.
    """
    from PIL import Image, ImageDraw

    b, _, h, w = recs.original.shape
    zoom = grid_zoom(max(h, w), min_tile)
    th, tw = h * zoom, w * zoom
    height = TITLE_H + CAPTION_H + len(ROWS) * (th + PAD) + PAD
    width = LABEL_W + b * (tw + PAD) + PAD
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(ROWS):
        y = TITLE_H + CAPTION_H + PAD + r * (th + PAD)
        for i, img in enumerate(getattr(recs, row)):
            x = LABEL_W + PAD + i * (tw + PAD)
            canvas[y : y + th, x : x + tw] = _to_uint8(img, zoom)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    font = _font()
    loss = f"mean masked L1={recs.loss.mean():.4f}"
    # loss first, so a title too long for a narrow grid loses its end, not the number
    head = f"{loss}  |  {title}" if title else loss
    draw.text((4, 1), _fit(draw, head, font, width - 8), fill=(0, 0, 0), font=font)
    draw.text((4, 14), _fit(draw, recs.target_note, font, width - 8), fill=(90, 90, 90), font=font)
    for i, loss in enumerate(recs.loss):
        draw.text((LABEL_W + PAD + i * (tw + PAD) + 2, TITLE_H), f"L1={loss:.3f}", fill=(0, 0, 0), font=font)
    for r, row in enumerate(ROWS):
        y = TITLE_H + CAPTION_H + PAD + r * (th + PAD) + th // 2 - 6
        draw.text((4, y), row, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def save_reconstruction_grid(
    model: SimMIM,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    path: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    title: str = "",
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> np.ndarray:
    """Reconstruct ``images`` (masks generated from ``seed`` when None), save the grid PNG at ``path`` and
    return it as uint8 [H, W, 3]."""
    from PIL import Image

    recs = reconstruct(model, images, masks, mean, std, mask_patch_size, mask_ratio, seed)
    grid = make_grid(recs, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
