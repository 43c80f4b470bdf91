"""``python -m simmim.visualize CHECKPOINT IMAGES... --out grid.png``: a reconstruction grid of the images."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simmim.data import BadImageWarning
from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simmim.visualize.grid import save_reconstruction_grid
from simmim.visualize.inputs import VisualizeError, load_images, load_simmim

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmim.visualize CHECKPOINT IMAGES... --out grid.png``: reconstruction grid of the images."""
    parser = argparse.ArgumentParser(
        prog="python -m simmim.visualize",
        description="Save a grid original / masked / prediction / pasted for images under a SimMIM checkpoint.",
    )
    parser.add_argument("checkpoint", help="pretraining checkpoint (runs/<recipe>/<name>/checkpoints/last.ckpt)")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", default="reconstructions.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, help="fraction of blocks masked (default: the checkpoint's)")
    parser.add_argument("--mask-patch-size", type=int, help="masked block side in px (default: the checkpoint's)")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="mask seed (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=16, help="at most this many images (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for flag, value in (("--max-images", args.max_images), ("--img-size", args.img_size)):
            if value is not None and value < 1:
                raise VisualizeError(f"{flag} must be >= 1, got {value}")
        model, info = load_simmim(args.checkpoint)
        img_size, mask_patch_size, mask_ratio = _geometry(args, info, model.patch_size)
        mean, std = info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD)
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always", BadImageWarning)
            try:
                images, files = load_images(args.images, img_size, mean, std, args.max_images)
            finally:  # one "warning:" line per skipped file, like the "error:" line, not a warnings traceback
                for w in skipped:
                    print(f"warning: {w.message}", file=sys.stderr)
        names = ", ".join(f.name for f in files)
        save_reconstruction_grid(
            model,
            images,
            None,
            args.out,
            mean,
            std,
            title=f"{Path(args.checkpoint).name}: {names}",
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            seed=args.seed,
        )
    except ValueError as e:  # VisualizeError, shape errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(images)} images, {img_size} px)")
    return 0


def _geometry(args: argparse.Namespace, info: dict[str, Any], patch_size: int) -> tuple[int, int, float]:
    """(img_size, mask_patch_size, mask_ratio) from the flags, else the checkpoint; errors name the flags
    (MaskGenerator's own would name its arguments, which the user never typed)."""

    def shown(flag: str, value: Any) -> str:
        given = getattr(args, flag[2:].replace("-", "_")) is not None
        return f"{flag} {value}" + ("" if given else " (the checkpoint's)")

    img_size = args.img_size if args.img_size is not None else info.get("img_size") or 192
    mask_patch_size = args.mask_patch_size if args.mask_patch_size is not None else info.get("mask_patch_size", 32)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else info.get("mask_ratio", 0.6)
    if mask_patch_size < 1:
        raise VisualizeError(f"{shown('--mask-patch-size', mask_patch_size)} must be >= 1")
    if not 0.0 < mask_ratio < 1.0:
        raise VisualizeError(f"{shown('--mask-ratio', mask_ratio)} must lie strictly between 0 and 1, e.g. 0.6")
    if img_size % mask_patch_size:
        raise VisualizeError(
            f"{shown('--img-size', img_size)} is not divisible by {shown('--mask-patch-size', mask_patch_size)}: "
            f"pass an --img-size that is a multiple of {mask_patch_size}, or another --mask-patch-size"
        )
    if mask_patch_size % patch_size:
        raise VisualizeError(
            f"{shown('--mask-patch-size', mask_patch_size)} is not divisible by the model's patch size "
            f"{patch_size}: pass a --mask-patch-size that is a multiple of {patch_size}"
        )
    return img_size, mask_patch_size, mask_ratio


if __name__ == "__main__":
    sys.exit(main())
