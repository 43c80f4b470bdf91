"""Fast decoding: simplejpeg gives PIL's pixels; PretrainTransform draws the same crops, flips and masks as the
albumentations pipeline and gives identical images at full size; decoding a large JPEG at reduced DCT scale keeps
the sampled crop and changes pixels by less than moving the crop by one source pixel."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from simmim.data import BadImageError, ImageFiles, SampleDataset, open_image
from simmim.data.images import decode_image
from simmim.data.transforms import PretrainTransform, SampleTransform, pretrain_transform, seed_children
from simmim.masking import MaskGenerator

LEVELS = (np.array([0.229, 0.224, 0.225]) * 255)[:, None, None]  # normalised units -> levels of 255


def _textured(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like test image: smooth waves at many frequencies, sharp-edged patches and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 128, np.float32)
    for _ in range(12):
        freq, angle, amp = rng.uniform(0.002, 0.08), rng.uniform(0, np.pi), rng.uniform(5, 30, 3)
        img += amp * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6))[..., None]
    for _ in range(30):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(1, max(2, width // 5), 2)
        img[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **({"quality": 90} | kw))
    return buf.getvalue()


def test_decode_image_gives_the_pixels_and_errors_of_pil():
    img = _textured(120, 90, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    cases = {
        "baseline": _jpeg(img),
        "progressive": _jpeg(img, progressive=True),
        "4:4:4": _jpeg(img, subsampling=0),
        "4:2:2": _jpeg(img, subsampling=1),
        "grey": _jpeg(img[:, :, 0]),
        "rotated (PIL path)": _jpeg(img, exif=exif.tobytes()),
    }
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG")
    cases["cmyk (PIL path)"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    cases["png (PIL path)"] = buf.getvalue()
    for name, data in cases.items():
        pixels, size = decode_image(data, name)
        reference = np.asarray(open_image(data))
        assert pixels.shape == reference.shape and np.array_equal(pixels, reference), name
        assert size == (reference.shape[1], reference.shape[0]), name
    assert decode_image(cases["rotated (PIL path)"], "r")[0].shape == (120, 90, 3)
    for data, reason in ((cases["baseline"][:900], "truncated"), (b"", "empty file"), (b"\xff\xd8\xffjunk", "")):
        with pytest.raises(BadImageError, match="cannot read image bad.jpg") as info:
            decode_image(data, "bad.jpg")
        with pytest.raises(BadImageError) as pil:
            open_image(data, name="bad.jpg")
        assert info.value.reason == pil.value.reason and reason in info.value.reason
    # decompression bombs are refused from the header, before decoding
    with pytest.raises(BadImageError, match="exceeds max_pixels=1000"):
        decode_image(cases["baseline"], "big.jpg", max_pixels=1000)


def test_pretrain_transform_draws_the_same_crops_and_gives_the_same_images(tmp_path):
    generator = MaskGenerator(64, 16, 4, 0.6)
    reference = SampleTransform(pretrain_transform(64), generator)
    fast = PretrainTransform(64, mask_generator=generator)
    images = [_textured(200, 150, 1), _textured(90, 130, 2), _textured(40, 30, 3)]  # down- and upscaling crops
    for n, image in enumerate(images):
        for i in range(12):
            seed = np.random.SeedSequence([7, 1, 100 * n + i])
            expected = reference(image, seed)
            box = reference.augment.transforms[0].params["crop_coords"]  # the reference RandomResizedCrop's draw
            assert fast.crop_box(seed_children(seed)[0], image.shape[1], image.shape[0]) == box
            got = fast(image, seed)
            assert torch.equal(got["image"], expected["image"]) and torch.equal(got["mask"], expected["mask"])


def test_reduced_jpeg_decoding_keeps_the_crop_within_resampling_noise(tmp_path):
    """1600x1200 photos cropped to 192 px: most crops decode at 1/2 scale. Each output differs from the
    full-size decode's by less than the same crop moved by one source pixel differs from it."""
    fast = PretrainTransform(192)
    reduced, moved, factors = [], [], []
    for n in range(2):
        data = _jpeg(_textured(1600, 1200, 10 + n))
        full, size = decode_image(data, "photo.jpg")
        assert size == (1600, 1200)
        for i in range(12):
            seed = np.random.SeedSequence([0, 3, 20 * n + i])
            small, full_size = decode_image(data, "photo.jpg", min_size=fast.decode_hint(seed))
            assert full_size == (1600, 1200)
            factors.append(1600 // small.shape[1])
            a, b = fast(full, seed)["image"].numpy(), fast(small, seed, full_size)["image"].numpy()
            x1, y1, x2, y2 = fast.crop_box(seed_children(seed)[0], 1600, 1200)  # the same box at full size
            if x2 < 1600 and y2 < 1200:
                exact = cv2.resize(full[y1:y2, x1:x2], (192, 192), interpolation=cv2.INTER_AREA).astype(float)
                shifted = cv2.resize(full[y1 + 1 : y2 + 1, x1 + 1 : x2 + 1], (192, 192), interpolation=cv2.INTER_AREA)
                reduced.append(np.abs((a - b) * LEVELS).mean())
                moved.append(np.abs(exact - shifted).mean())
    assert factors.count(2) >= 20  # crops of at least 4x the output size: decoded at half size
    reduced, moved = np.array(reduced), np.array(moved)
    assert (reduced < moved).all(), (reduced, moved)
    assert reduced.mean() < 0.6 * moved.mean() and reduced.max() < 1.5


def test_the_dataset_decodes_large_jpegs_reduced_with_the_same_seeds(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(_textured(1600, 1200, 5)))
    files = ImageFiles([path] * 4)
    generator = MaskGenerator(192, 32, 4, 0.6)
    fast = SampleDataset(files, PretrainTransform(192, mask_generator=generator), seed=1)
    reference = SampleDataset(files, SampleTransform(pretrain_transform(192), generator), seed=1)
    for key in [(i, e) for i in range(4) for e in range(3)]:
        a, b = fast[key], reference[key]
        assert torch.equal(a["mask"], b["mask"])
        assert (a["image"] - b["image"]).abs().mul(torch.tensor(LEVELS)).mean() < 1.5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_cross_as_8_bit_and_equal_the_normalised_samples(tmp_path, num_workers):
    """The pretraining loader moves 8-bit images out of its workers and normalises each batch with the per-sample
    lookup table: batches are float32 and equal to stacking dataset[i] (and the on-device path gives the same)."""
    from simmim.data import PretrainDataModule

    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(_textured(160, 120, i)))
    dm = PretrainDataModule(
        tmp_path, "folder", img_size=64, mask_patch_size=16, batch_size=4, num_workers=num_workers,
        pin_memory=False, val_root=None,
    )  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    keys = list(dm.train_sampler)
    for n, batch in enumerate(loader):
        expected = [dm.train_set[k] for k in keys[4 * n : 4 * n + 4]]
        assert batch["image"].dtype == torch.float32
        assert torch.equal(batch["image"], torch.stack([e["image"] for e in expected]))
        assert torch.equal(batch["mask"], torch.stack([e["mask"] for e in expected]))
    raw = torch.stack([r["image"] for r in loader.dataset.__getitems__(keys[:4])])
    assert raw.dtype == torch.uint8
    on_device = dm.on_after_batch_transfer({"image": raw.clone(), "mask": None}, 0)["image"]
    reference = torch.stack([dm.train_set[k]["image"] for k in keys[:4]])
    assert torch.equal(on_device, reference)
    assert torch.equal(dm.transform._gather(raw), reference)  # the lookup used on GPUs, here on CPU tensors
