"""Augmentations (albumentations) and the per-sample seeding that makes them reproducible.

Every sample's randomness comes from ``np.random.SeedSequence([seed, epoch, index])``: each node of the
albumentations tree gets its own child seed (albumentations' ``Compose.set_random_seed`` would give every
transform the *same* seed, correlating e.g. the crop scale with the flip decision), and the mask generator gets
another one. So a (seed, epoch, index) triple always yields the same crop, flip, RandAugment ops and mask, in any
worker process and after a resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise queries PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image  # noqa: E402

from simmim.masking import MaskGenerator  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomErasing",
    "SampleTransform",
    "eval_transform",
    "finetune_transform",
    "pretrain_transform",
    "rand_augment",
    "seed_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # official eval: resize the shorter side to int(256/224 * img_size), centre crop


def seed_transform(transform: A.BasicTransform | A.BaseCompose, seed: np.random.SeedSequence) -> None:
    """Give every node of an albumentations tree its own generator derived from ``seed``."""
    nodes = _nodes(transform)
    for node, state in zip(nodes, seed.generate_state(len(nodes))):
        node.set_random_seed(int(state))  # parents first: a Compose propagates its seed, children then override it


def _nodes(transform: A.BasicTransform | A.BaseCompose) -> list:
    out = [transform]
    if isinstance(transform, A.BaseCompose):
        for child in transform.transforms:
            out += _nodes(child)
    return out


class RandomErasing(A.ImageOnlyTransform):
    """timm's RandomErasing (mode "pixel", one box) on a normalised float HWC image, as the official fine-tuning.

    With probability ``p`` a box of area fraction in ``scale`` and log-uniform aspect ratio in ``ratio`` is filled
    with N(0, 1) noise (in normalised space, i.e. noise around the dataset mean); 10 tries to fit it in the image.
    """

    def __init__(self, scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3), p=0.25):
        super().__init__(p=p)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        h, w = img.shape[:2]
        rng = self.random_generator
        for _ in range(10):
            area = rng.uniform(*self.scale) * h * w
            aspect = math.exp(rng.uniform(*self.log_ratio))
            eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                img = img.copy()
                img[top : top + eh, left : left + ew] = rng.standard_normal((eh, ew, img.shape[2]), dtype=np.float32)
                break
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale",)


def rand_augment(num_ops: int = 2, magnitude: float = 9, p: float = 0.5, fill: Sequence[int] = (124, 116, 104)):
    """RandAugment in the spirit of timm's ``rand-m9-mstd0.5-inc1`` (the official fine-tuning), from albumentations.

    ``num_ops`` ops drawn with replacement, each applied with probability ``p``. Magnitudes follow timm's
    "increasing" ranges at level ``magnitude`` +- 1 (about +- 2 x mstd 0.5), with a random sign for signed ops.
    Differences from timm: SolarizeAdd is omitted, Sharpness only sharpens, and the chosen ops run in list order.
    ``fill`` (the ImageNet mean pixel) pads geometric ops.
    """
    lo, hi = max(magnitude - 1, 0) / 10, min(magnitude + 1, 10) / 10

    def signed(make, max_value: float) -> A.OneOf:
        return A.OneOf([make((lo * max_value, hi * max_value)), make((-hi * max_value, -lo * max_value))], p=p)

    def affine(**kw) -> A.Affine:
        return A.Affine(**kw, interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=tuple(fill), p=1)

    def enhance(name: str) -> A.OneOf:  # PIL ImageEnhance: factor 1 +- 0.9 * level
        def jitter(r: tuple[float, float]) -> A.ColorJitter:
            factors = {"brightness": 0, "contrast": 0, "saturation": 0, name: (1 + r[0], 1 + r[1])}
            return A.ColorJitter(**factors, hue=0, p=1)

        return signed(jitter, 0.9)

    bits = 4 - int(magnitude / 10 * 4)  # timm PosterizeIncreasing keeps 4 down to 0 bits
    ops = [
        A.AutoContrast(method="pil", p=p),
        A.Equalize(mode="pil", p=p),
        A.InvertImg(p=p),
        signed(lambda r: affine(rotate=r), 30.0),
        A.Posterize(num_bits=max(bits, 1), p=p),
        A.Solarize(threshold_range=(1 - hi, 1 - lo), p=p),  # timm: threshold 256 - level * 256
        enhance("saturation"),
        enhance("contrast"),
        enhance("brightness"),
        # PIL sharpness f = img + (f - 1) * (img - smooth3x3) equals Sharpen's kernel at alpha = (f - 1) / 13
        A.Sharpen(alpha=(lo * 0.9 / 13, hi * 0.9 / 13), lightness=(1.0, 1.0), p=p),
        signed(lambda r: affine(shear={"x": _atan_deg(r), "y": (0, 0)}), 0.3),
        signed(lambda r: affine(shear={"x": (0, 0), "y": _atan_deg(r)}), 0.3),
        signed(lambda r: affine(translate_percent={"x": r, "y": (0, 0)}), 0.45),
        signed(lambda r: affine(translate_percent={"x": (0, 0), "y": r}), 0.45),
    ]
    return A.SomeOf(ops, n=num_ops, replace=True, p=1)


def _atan_deg(r: tuple[float, float]) -> tuple[float, float]:
    # timm shears by a factor (tan of the angle); albumentations takes degrees
    return (math.degrees(math.atan(r[0])), math.degrees(math.atan(r[1])))


def pretrain_transform(
    img_size: int = 192,
    crop_scale: tuple[float, float] = (0.67, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Official SimMIM pretraining augmentation: RandomResizedCrop (bilinear), horizontal flip, normalise."""
    return A.Compose(
        [
            # INTER_AREA when shrinking stands in for torchvision's antialiased bilinear resize
            A.RandomResizedCrop(
                (img_size, img_size),
                scale=tuple(crop_scale),
                ratio=tuple(crop_ratio),
                interpolation=cv2.INTER_LINEAR,
                area_for_downscale="image",
            ),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )


def finetune_transform(
    img_size: int = 224,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    rand_augment_ops: int = 2,
    rand_augment_magnitude: float = 9,
    random_erasing: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Official fine-tuning train augmentation: bicubic RandomResizedCrop, flip, RandAugment, normalise, erasing.

    ``rand_augment_ops=0`` disables RandAugment; ``random_erasing=0`` disables erasing.
    """
    fill = tuple(round(255 * m) for m in mean)
    return A.Compose(
        [
            A.RandomResizedCrop(
                (img_size, img_size), scale=tuple(crop_scale), interpolation=cv2.INTER_CUBIC, area_for_downscale="image"
            ),
            A.HorizontalFlip(p=0.5),
            *([rand_augment(rand_augment_ops, rand_augment_magnitude, fill=fill)] if rand_augment_ops else []),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            *([RandomErasing(p=random_erasing)] if random_erasing else []),
            ToTensorV2(),
        ]
    )


def eval_transform(
    img_size: int = 224,
    resize_ratio: float = EVAL_RESIZE_RATIO,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Official evaluation: resize the shorter side to ``int(resize_ratio * img_size)`` (bicubic), centre crop."""
    return A.Compose(
        [
            A.SmallestMaxSize(
                max_size=int(resize_ratio * img_size), interpolation=cv2.INTER_CUBIC, area_for_downscale="image"
            ),
            A.CenterCrop(img_size, img_size),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )


class SampleTransform:
    """PIL RGB image + per-sample seed -> ``{"image": float32 [3,H,W]}`` (+ ``"mask"`` int64 when masking).

    ``augment`` is an albumentations pipeline ending in ``ToTensorV2`` (CHW tensor); ``mask_generator``
    (pretraining) draws the SimMIM mask from its own child of the seed, so masks do not depend on which
    augmentations ran.
    """

    def __init__(self, augment: A.Compose, mask_generator: MaskGenerator | None = None) -> None:
        self.augment = augment
        self.mask_generator = mask_generator

    def __call__(self, image: Image.Image, seed: np.random.SeedSequence) -> dict[str, torch.Tensor]:
        aug_seed, mask_seed = (np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, k)) for k in (0, 1))
        seed_transform(self.augment, aug_seed)
        out = {"image": self.augment(image=np.asarray(image))["image"]}
        if self.mask_generator is not None:
            out["mask"] = torch.from_numpy(self.mask_generator(np.random.default_rng(mask_seed)))
        return out

    def __repr__(self) -> str:
        return f"SampleTransform({self.augment!r}, mask_generator={self.mask_generator!r})"
