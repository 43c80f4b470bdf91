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

:func:`decode_image` is the fast path the data pipeline uses: encoded bytes -> numpy RGB. Plain JPEGs (YCbCr or
greyscale, no EXIF/XMP orientation other than "upright") decode with simplejpeg (libjpeg-turbo straight into numpy,
the same pixels as PIL's decoder in a third to a half less time), optionally reduced by 2, 4 or 8 in the DCT domain
when the caller says the decoded image may be that much smaller; everything else goes through :func:`open_image`,
so conversions and error messages stay those above.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

__all__ = ["IMG_EXTENSIONS", "MAX_PIXELS", "BadImageError", "decode_image", "open_image", "is_image_file"]

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


def open_image(
    path: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode ``path`` (a file, or the encoded bytes of one) fully into an RGB, 8-bit PIL image (see the module
    docstring for the conversions).

    Raises ``BadImageError`` naming the file (``name`` for bytes) when it cannot be decoded or claims more than
    ``max_pixels`` pixels (``None``: no limit).
    """
    data = path if isinstance(path, (bytes, bytearray, memoryview)) else None
    path = Path(path) if data is None else (name or "<bytes>")
    try:
        with warnings.catch_warnings():
            # our max_pixels check below decides; PIL's warning would only duplicate it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else _NamedBytes(data, path)) as img:
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
        empty = len(data) == 0 if data is not None else path.is_file() and path.stat().st_size == 0
        reason = "empty file" if empty else f"{type(err).__name__}: {err}"
        raise BadImageError(path, reason) from err


class _NamedBytes(io.BytesIO):
    """In-memory file bytes whose repr is their name: PIL's messages then read as for a file on disk."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name)


def decode_image(
    data: bytes,
    name: str,
    max_pixels: int | None = MAX_PIXELS,
    min_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> (H x W x 3 uint8 RGB array, (width, height) of the full-resolution upright image).

    ``min_size(width, height)`` -> (min_width, min_height): how small the decoded image may be (e.g. a crop drawn
    from the full size that must keep enough pixels); a plain JPEG is then decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg-turbo's DCT-domain scaling: a proper low-pass reduction, and 2-10x less work) when that still meets
    both minimums. Only these factors are used: libjpeg's in-between ones (7/8, 3/4, ...) decode *slower* than full
    size. Raises ``BadImageError`` naming ``name``, as :func:`open_image` does.
    """
    if data[:3] == b"\xff\xd8\xff" and _plain_jpeg(data):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # let PIL give its verdict (and its message)
        if colorspace in ("Gray", "YCbCr", "RGB"):
            if max_pixels is not None and width * height > max_pixels:
                raise BadImageError(
                    name, f"{width}x{height} pixels exceeds max_pixels={max_pixels} (decompression bomb?)"
                )
            factor = 1
            if min_size is not None:
                min_w, min_h = min_size(width, height)
                factor = next((f for f in (8, 4, 2) if width / f >= min_w and height / f >= min_h), 1)
            try:
                pixels = simplejpeg.decode_jpeg(
                    data, "RGB", min_width=math.ceil(width / factor), min_height=math.ceil(height / factor)
                )
                return pixels, (width, height)
            except ValueError:
                pass  # truncated or corrupt: PIL decides, with its own message
    image = open_image(data, max_pixels, name)
    return np.asarray(image), image.size


_XMP_ORIENTATION = re.compile(rb"tiff:Orientation(?:=\"|>)\s*(\d+)")


def _plain_jpeg(data: bytes) -> bool:
    """True when the JPEG's header segments ask for no rotation: no EXIF orientation but 1 (upright), no XMP one
    (PIL reads XMP's when EXIF has none). Anything unexpected answers False: PIL's path then handles it."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image: the header is over
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1:
            segment = data[i + 4 : i + 2 + length]
            if segment.startswith(b"Exif\x00\x00"):
                if _exif_orientation(segment[6:]) not in (None, 1):
                    return False
            else:
                found = _XMP_ORIENTATION.search(segment)
                if found and found.group(1) != b"1":
                    return False
        i += 2 + length
    return False


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 in an EXIF TIFF block; None when absent, -1 when unreadable."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, _, _ = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k + 8)[0]
    except (KeyError, struct.error):
        return -1
    return None


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
