"""Reading any image file as an 8-bit RGB PIL image, or failing with an error that names the file.

Conversions (the model always sees 3 x 8-bit channels):

- EXIF orientation is applied first (phone photos are stored sideways with an orientation tag).
- Greyscale (``1``, ``L``), palette (``P``), CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB.
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index): composited on black, so a transparent
  pixel reads as "nothing there" whatever colour happens to be stored under it.
- 16-bit and 32-bit integer / float greyscale (``I;16*``, ``I``, ``F``): scaled, never clipped. ``I;16*`` maps
  0..65535 to 0..255; ``F`` within 0..1 is scaled by 255; otherwise ``I`` and ``F`` are read as 8-bit if they
  fit in 0..255, as 16-bit if they fit in 0..65535, else min-max scaled per image.

Decompression bombs: an image whose header claims more than ``max_pixels`` pixels (default PIL's own warning
threshold, ~89.5 Mpx) is rejected as a bad file before anything is decoded. PIL's global
``Image.MAX_IMAGE_PIXELS`` is left untouched; PIL still refuses images over twice that limit, so to accept larger
images raise both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMG_EXTENSIONS", "MAX_PIXELS", "BadImageError", "open_image", "is_image_file"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MAX_PIXELS = 89_478_485  # PIL's default DecompressionBombWarning threshold (1024 * 1024 * 1024 // 4 // 3)


class BadImageError(OSError):
    """An image file that cannot be decoded (truncated, empty, not an image, too large)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension (case-insensitive)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def open_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into an RGB, 8-bit PIL image (see the module docstring for the conversions).

    Raises ``BadImageError`` naming the file when it cannot be decoded or claims more than ``max_pixels`` pixels
    (``None``: no limit).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # our max_pixels check below decides; PIL's warning would only duplicate it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise BadImageError(
                        path, f"{img.width}x{img.height} pixels exceeds max_pixels={max_pixels} (decompression bomb?)"
                    )
                img.load()  # decode now: truncated data fails here, not later inside a transform
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except BadImageError:
        raise
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error, ...) means a bad file
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
        raise BadImageError(path, reason) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # I;16, I;16B, I;16L: a known 16-bit range
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    is_float = a.dtype.kind == "f"
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0 and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.rint(a / 257.0).astype(np.uint8)
    return np.rint((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
