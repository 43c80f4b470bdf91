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
import random
from collections.abc import Callable, Sequence

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
    "PretrainTransform",
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
    """PIL RGB image (or H x W x 3 uint8 array) + per-sample seed -> ``{"image": float32 [3,H,W]}`` (+ ``"mask"``
    int64 when masking).

    ``augment`` is an albumentations pipeline ending in ``ToTensorV2`` (CHW tensor); ``mask_generator``
    (pretraining) draws the SimMIM mask from its own child of the seed, so masks do not depend on which
    augmentations ran. :meth:`decode_hint` may let the decoder return a smaller image (see :class:`PretrainTransform`);
    this class decodes everything at full size.
    """

    def __init__(self, augment: A.Compose, mask_generator: MaskGenerator | None = None) -> None:
        self.augment = augment
        self.mask_generator = mask_generator

    def decode_hint(self, seed: np.random.SeedSequence) -> Callable[[int, int], tuple[int, int]] | None:
        """(full width, height) -> the smallest decoded size that leaves this sample's augmentation the same apart
        from resampling; None: decode at full size."""
        return None

    def __call__(
        self, image: Image.Image | np.ndarray, seed: np.random.SeedSequence, full_size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """``full_size``: (width, height) of the image at full resolution when ``image`` was decoded smaller."""
        aug_seed, mask_seed = seed_children(seed)
        out = {"image": self._augment(np.asarray(image), aug_seed, full_size)}
        if self.mask_generator is not None:
            out["mask"] = torch.from_numpy(self.mask_generator(np.random.default_rng(mask_seed)))
        return out

    def _augment(
        self, image: np.ndarray, seed: np.random.SeedSequence, full_size: tuple[int, int] | None
    ) -> torch.Tensor:
        seed_transform(self.augment, seed)
        return self.augment(image=image)["image"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.augment!r}, mask_generator={self.mask_generator!r})"


def seed_children(seed: np.random.SeedSequence) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """The augmentation's and the mask's seeds: children 0 and 1 of the sample's seed."""
    return tuple(np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, k)) for k in (0, 1))


class PretrainTransform(SampleTransform):
    """:func:`pretrain_transform` (RandomResizedCrop, flip, normalise) with the same crop box, flip and pixels for
    a seed, done in fewer and cheaper steps, and able to work on an image decoded smaller than its full size.

    The albumentations nodes still draw every random parameter (each from the generator ``seed_transform`` would
    give it), so the augmentation distribution is albumentations' by construction; this class only executes them:
    crop + resize with albumentations' interpolation rule, flip, and one 3-channel lookup table for the
    normalisation (the table is the reference ``Normalize`` applied to every byte value, so values are identical).

    :meth:`decode_hint` draws the crop from the full image size before the image is decoded: when the crop is at
    least 4x the output size, a JPEG can be decoded at 1/2 (8x: 1/4, 16x: 1/8) scale in the DCT domain and the crop
    taken from that, still at least twice the output size. The box then moves by at most half a reduced pixel
    (<= 1/4 output pixel) and the DCT reduction does part of the area-averaging downscale: the output differs by
    less than swapping OpenCV's area resize for PIL's antialiased bilinear one (the official code's) does (tested).
    At full size the output is identical to ``pretrain_transform``'s.
    """

    def __init__(
        self,
        img_size: int = 192,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        mask_generator: MaskGenerator | None = None,
    ) -> None:
        super().__init__(pretrain_transform(img_size, crop_scale, crop_ratio, mean, std), mask_generator)
        nodes = _nodes(self.augment)
        self._crop, self._flip, normalize = nodes[1], nodes[2], nodes[3]
        self._crop_node, self._flip_node, self._count = 1, 2, len(nodes)  # positions in seed_transform's order
        ramp = np.arange(256, dtype=np.uint8).reshape(256, 1, 1).repeat(3, axis=2)
        self._lut = np.ascontiguousarray(normalize(image=ramp)["image"], dtype=np.float32)  # [256, 1, 3]
        self.size = (img_size, img_size)
        self._last_states: tuple | None = None

    def _states(self, seed: np.random.SeedSequence) -> np.ndarray:
        """The seed of every node, as ``seed_transform`` gives them (the last sample's kept: the decode hint and
        the augmentation of one sample both need them)."""
        key = (np.asarray(seed.entropy).tobytes(), seed.spawn_key)
        if self._last_states is None or self._last_states[0] != key:
            self._last_states = (key, seed.generate_state(self._count))
        return self._last_states[1]

    def crop_box(self, seed: np.random.SeedSequence, width: int, height: int) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) on the full-size image: the RandomResizedCrop node's draw for this seed."""
        state = self._states(seed)[self._crop_node]
        self._crop.py_random = random.Random(int(state))  # what set_random_seed gives it (its numpy one is unused)
        return self._crop.get_params_dependent_on_data({"shape": (height, width)}, {})["crop_coords"]

    def decode_hint(self, seed: np.random.SeedSequence) -> Callable[[int, int], tuple[int, int]]:
        aug_seed = seed_children(seed)[0]
        out_h, out_w = self.size

        def min_size(width: int, height: int) -> tuple[int, int]:
            x1, y1, x2, y2 = self.crop_box(aug_seed, width, height)
            # the reduced crop keeps at least twice the output size, so the area downscale after it still averages
            # 2x2+ pixels per output pixel and rounding the box to reduced pixels moves it by <= 1/4 output pixel
            return math.ceil(width * 2 * out_w / (x2 - x1)), math.ceil(height * 2 * out_h / (y2 - y1))

        return min_size

    def raw(
        self, image: Image.Image | np.ndarray, seed: np.random.SeedSequence, full_size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """As calling it, but ``image`` stays 8-bit (uint8 [3,H,W]): :meth:`normalize` turns a batch of them into
        exactly what calling gives."""
        aug_seed, mask_seed = seed_children(seed)
        out = {"image": torch.from_numpy(self._crop_flip(np.asarray(image), aug_seed, full_size).transpose(2, 0, 1))}
        if self.mask_generator is not None:
            out["mask"] = torch.from_numpy(self.mask_generator(np.random.default_rng(mask_seed)))
        return out

    def normalize(self, images: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
        """uint8 images [..., 3, H, W] -> float32, normalised with the same lookup table as per sample (so equal
        bit for bit), on the images' device; ``pin_memory``: the CPU result in page-locked memory."""
        shape = images.shape
        if images.device.type != "cpu":
            return self._gather(images)
        out = torch.empty(shape, dtype=torch.float32, pin_memory=pin_memory and torch.cuda.is_available())
        planes, results = images.reshape(-1, 3, shape[-2], shape[-1]).numpy(), out.view(-1, 3, *shape[-2:]).numpy()
        tables = [np.ascontiguousarray(self._lut[:, 0, c]) for c in range(3)]
        for k in range(planes.shape[0]):
            for c in range(3):
                cv2.LUT(planes[k, c], tables[c], dst=results[k, c])
        return out

    def _gather(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` with torch ops on any device (the table looked up per channel)."""
        table = torch.from_numpy(self._lut[:, 0, :].T.copy()).to(images.device)  # [3, 256]
        flat = images.reshape(-1, 3, images.shape[-2] * images.shape[-1]).long()
        return torch.gather(table.expand(flat.shape[0], 3, 256), 2, flat).reshape(images.shape)

    def _augment(
        self, image: np.ndarray, seed: np.random.SeedSequence, full_size: tuple[int, int] | None
    ) -> torch.Tensor:
        return torch.from_numpy(cv2.LUT(self._crop_flip(image, seed, full_size), self._lut).transpose(2, 0, 1))

    def _crop_flip(
        self, image: np.ndarray, seed: np.random.SeedSequence, full_size: tuple[int, int] | None
    ) -> np.ndarray:
        """The cropped, resized and maybe flipped 8-bit image (H x W x 3)."""
        height, width = image.shape[:2]
        full_w, full_h = full_size or (width, height)
        x1, y1, x2, y2 = self.crop_box(seed, full_w, full_h)
        interpolation = self._crop._get_interpolation_for_resize((y2 - y1, x2 - x1), "image")
        if (width, height) == (full_w, full_h):
            out = cv2.resize(image[y1:y2, x1:x2], self.size[::-1], interpolation=interpolation)
        else:
            out = self._reduced_crop(image, round(full_w / width), (x1, y1, x2, y2), interpolation)
        state = self._states(seed)[self._flip_node]
        self._flip.py_random = random.Random(int(state))
        if self._flip.should_apply():
            out = cv2.flip(out, 1)
        return out

    def _reduced_crop(self, image: np.ndarray, k: int, box: tuple[int, ...], interpolation: int) -> np.ndarray:
        """The full-size crop ``box`` resized to the output, taken from ``image`` decoded at 1/k: the box rounded to
        reduced pixels is resized, then shifted and scaled by its rounding error (a bilinear warp of the small
        output), so output pixels sample the same places as at full size."""
        out_h, out_w = self.size
        left, top, right, bottom = (v / k for v in box)  # the exact box in reduced pixels
        x1, x2 = round(left), min(max(round(right), round(left) + 1), image.shape[1])
        y1, y2 = round(top), min(max(round(bottom), round(top) + 1), image.shape[0])
        out = cv2.resize(image[y1:y2, x1:x2], (out_w, out_h), interpolation=interpolation)
        sx, sy = (right - left) / (x2 - x1), (bottom - top) / (y2 - y1)  # output pixel i lies at sx * i + shift
        warp = np.float32(
            [
                [sx, 0, (left - x1) * out_w / (x2 - x1) + 0.5 * sx - 0.5],
                [0, sy, (top - y1) * out_h / (y2 - y1) + 0.5 * sy - 0.5],
            ]
        )
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        return cv2.warpAffine(out, warp, (out_w, out_h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
