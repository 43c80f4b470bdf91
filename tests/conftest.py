"""Shared fixtures: small real image files on disk."""

import numpy as np
import pytest
from PIL import Image

import simmim  # noqa: F401 - first, so its OpenMP wait policy is set before torch loads (see simmim/__init__.py)


def write_images(folder, n: int, size: int = 40, seed: int = 0):
    """``n`` PNGs of ``size`` px: smooth colour gradients with a few solid rectangles (learnable structure)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 * (1 - xx[..., None]) + c1 * yy[..., None]
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 8, 2)
            w, h = rng.integers(4, 16, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """24 small RGB PNGs in a flat folder."""
    return write_images(tmp_path_factory.mktemp("images"), 24)
