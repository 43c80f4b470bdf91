"""simmim.data on real files written to tmp_path (and the real Fashion-MNIST idx files)."""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer, write_images
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import (
    BadImageError,
    BadImageWarning,
    ClassificationDataModule,
    DataError,
    EpochSampler,
    FashionMNIST,
    ImageFiles,
    PretrainDataModule,
    TooManyBadFilesError,
    detect_source,
    label_subset,
    open_image,
    read_idx,
)
from simmim.data import fashion_mnist as fashion_mnist_module


def _rgb(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature), with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _write_bad_files(folder: Path) -> list[Path]:
    """One file of every unreadable kind; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    _rgb(1, (64, 64)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    _rgb(2, (64, 64)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(_png_header(10_000, 10_000))  # 100 Mpx: PIL itself only warns
    return sorted(folder.iterdir())


def _write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [_save(_rgb(start + i), folder / f"img{start + i:03d}.jpg", quality=95) for i in range(n)]


# ---------------------------------------------------------------------------------------------- open_image


def test_open_image_converts_every_mode_to_rgb(tmp_path):
    rgb = _save(_rgb(0), tmp_path / "rgb.png")
    grey = _save(Image.new("L", (7, 5), 200), tmp_path / "grey.png")
    rgba_img = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    rgba_img.putpixel((0, 0), (10, 20, 30, 255))
    rgba = _save(rgba_img, tmp_path / "rgba.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    palette = _save(pal, tmp_path / "palette.png", transparency=1)  # index 1 (white) is transparent
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    deep = np.tile(np.array([0, 257 * 64, 32896, 65535], np.uint16), (3, 1))
    deep_path = _save(Image.fromarray(deep), tmp_path / "deep16.png")
    deep32 = _save(Image.fromarray(deep.astype(np.int32)), tmp_path / "deep32.tif")
    unit_float = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), tmp_path / "float.tif")
    tiny = _save(_rgb(3, (5, 5)), tmp_path / "tiny.png")

    for path in (rgb, grey, rgba, palette, cmyk, deep_path, deep32, unit_float, tiny):
        img = open_image(path)
        assert img.mode == "RGB", path
    assert np.array_equal(np.asarray(open_image(rgb)), np.asarray(Image.open(rgb)))
    assert open_image(grey).getpixel((6, 4)) == (200, 200, 200)
    assert open_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert open_image(rgba).getpixel((1, 1)) == (0, 0, 0)  # transparent white composited on black
    assert open_image(palette).getpixel((1, 1)) == (0, 0, 0)
    assert max(abs(a - b) for a, b in zip(open_image(cmyk).getpixel((4, 4)), (255, 0, 0))) <= 2
    assert Image.open(deep_path).mode.startswith("I")
    assert np.asarray(open_image(deep_path))[0, :, 0].tolist() == [0, 64, 128, 255]  # scaled, not clipped
    assert Image.open(deep32).mode == "I" and np.asarray(open_image(deep32))[0, :, 1].tolist() == [0, 64, 128, 255]
    assert Image.open(unit_float).mode == "F" and np.asarray(open_image(unit_float))[0, :, 2].tolist() == [0, 128, 255]
    assert open_image(tiny).size == (5, 5)


def test_open_image_applies_exif_orientation(tmp_path):
    img = _rgb(4, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "phone.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert open_image(path).size == (20, 40)


def test_open_image_bad_files_raise_naming_the_file(tmp_path):
    reasons = {}
    for path in _write_bad_files(tmp_path):
        with pytest.raises(BadImageError) as info:
            open_image(path)
        assert str(path) in str(info.value)
        reasons[path.name] = info.value.reason
    assert reasons["empty.jpg"] == "empty file"
    assert "max_pixels" in reasons["bomb.png"]


# ---------------------------------------------------------------------------------------------- sources


def test_flat_folder_recursive_sorted_case_insensitive(tmp_path):
    _save(_rgb(0), tmp_path / "b.JPG")
    _save(_rgb(1), tmp_path / "a" / "deep" / "c.PnG")
    _save(_rgb(2), tmp_path / "a" / "d.jpeg")
    _save(_rgb(3), tmp_path / ".hidden" / "e.jpg")
    _save(_rgb(4), tmp_path / "._f.jpg", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_source(tmp_path) == "folder"
    files = ImageFiles.from_folder(tmp_path)
    names = [Path(files.name(i)).relative_to(tmp_path).as_posix() for i in range(len(files))]
    assert names == ["a/d.jpeg", "a/deep/c.PnG", "b.JPG"]
    assert files.labels.tolist() == [-1, -1, -1]
    assert files.load(2).size == (48, 40)


def test_imagefolder_labels_and_detection(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        _write_images(tmp_path / cls / "sub", n, start=10 * n)
    (tmp_path / "README.md").write_text("class folders")
    assert detect_source(tmp_path) == "imagefolder"
    files = ImageFiles.from_imagefolder(tmp_path)
    assert files.class_names == ["cat", "dog"]
    assert files.labels.tolist() == [0, 0, 0, 1, 1]
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class holds no images"):
        ImageFiles.from_imagefolder(tmp_path)


def test_filelist_with_and_without_labels(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    (tmp_path / "with space.png").write_bytes((tmp_path / "imgs" / "img000.jpg").read_bytes())
    lst = tmp_path / "train.txt"
    lst.write_text("# path label\nimgs/img000.jpg 2\n\nimgs/img001.jpg 0\nwith space.png\t1\n")
    assert detect_source(lst) == "filelist"
    files = ImageFiles.from_filelist(lst)
    assert [Path(files.name(i)).name for i in range(3)] == ["img000.jpg", "img001.jpg", "with space.png"]
    assert files.labels.tolist() == [2, 0, 1] and files.class_names == ["0", "1", "2"]
    assert files.load(2).size == (48, 40)

    lst.write_text("imgs/img000.jpg dog\nimgs/img001.jpg cat\n")
    files = ImageFiles.from_filelist(lst)
    assert files.class_names == ["cat", "dog"] and files.labels.tolist() == [1, 0]
    lst.write_text(f"{tmp_path / 'imgs' / 'img002.jpg'}\nimgs/img001.jpg\n")
    assert ImageFiles.from_filelist(lst).labels.tolist() == [-1, -1]
    lst.write_text("imgs/img000.jpg 1\nimgs/img001.jpg\n")
    with pytest.raises(ValueError, match=r"train.txt:2: some lines have a label"):
        ImageFiles.from_filelist(lst)
    lst.write_text("with space.png 1\n")
    with pytest.raises(ValueError, match="separate the label by a tab"):
        ImageFiles.from_filelist(lst)


def test_missing_and_empty_roots_fail_before_any_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected a folder of images"):
        PretrainDataModule(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no image files .* found under .*empty \(searched recursively\)"):
        PretrainDataModule(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        PretrainDataModule(tmp_path / "docs", source="folder")
    with pytest.raises(ValueError, match="unknown data source 'zip'"):
        PretrainDataModule(tmp_path / "docs", source="zip")
    _write_images(tmp_path / "flat", 4)
    with pytest.raises(ValueError, match="has no labels: classification needs an ImageFolder"):
        ClassificationDataModule(tmp_path / "flat", val_fraction=0.5)
    _write_images(tmp_path / "tree" / "train" / "a", 2)
    with pytest.raises(ValueError, match="no validation images .*pass val_root"):
        ClassificationDataModule(tmp_path / "tree")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_read_idx_and_fashion_mnist_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)  # raw and gzipped files may be mixed
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:4])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:4])
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    train, test = FashionMNIST(tmp_path), FashionMNIST(tmp_path, train=False)
    assert (len(train), len(test)) == (12, 4)
    img = train.load(5)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 1], images[5])
    assert train.labels.tolist() == labels.tolist() and train.class_names[9] == "Ankle boot"

    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 100, 28, 28) + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad")
    monkeypatch.setattr(fashion_mnist_module, "FASHION_MNIST_DIRS", (tmp_path / "cache",))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST()


def test_real_fashion_mnist_files():
    try:
        train, test = FashionMNIST(), FashionMNIST(train=False)
    except FileNotFoundError as err:
        pytest.fail(f"the Fashion-MNIST idx files must be installed for this test ({err})")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------- bad data


def _pretrain(root, **kw) -> PretrainDataModule:
    kw = {"img_size": 32, "mask_patch_size": 16, "model_patch_size": 4, "batch_size": 4, "num_workers": 0} | kw
    return PretrainDataModule(root, **kw)


def _every_sample(dataset, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=1, sampler=EpochSampler(len(dataset), 1, drop_last=False), num_workers=num_workers
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_counted_and_replaced(tmp_path, num_workers):
    _write_images(tmp_path / "data", 6)
    _save(_rgb(9, (5, 5)), tmp_path / "data" / "tiny.png")  # smaller than the crop: upsampled, not bad
    bad = _write_bad_files(tmp_path / "data" / "bad")
    dm = _pretrain(tmp_path / "data", source="folder", batch_size=1, num_workers=num_workers, val_fraction=0.0)
    dm.setup("fit")
    loader = _every_sample(dm.train_set, num_workers)
    with pytest.warns(BadImageWarning) if num_workers == 0 else contextlib.nullcontext():
        batches = list(loader)
    assert len(batches) == 12 and all(b["image"].shape == (1, 3, 32, 32) for b in batches)
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    assert dm.num_bad_files == len(bad) == 5  # counted once each, across workers
    if num_workers == 0:
        assert set(dm.train_set.bad_files) == {str(p) for p in bad}
    again = list(_every_sample(dm.train_set, num_workers))
    assert dm.num_bad_files == 5
    for b1, b2 in zip(batches, again):  # replacements are deterministic
        assert torch.equal(b1["image"], b2["image"])


def test_too_many_bad_files_is_an_error_naming_them(tmp_path):
    _write_images(tmp_path / "data", 2)
    _write_bad_files(tmp_path / "data")
    dm = _pretrain(tmp_path / "data", batch_size=1, max_bad_files=2)
    dm.setup("fit")
    with pytest.warns(BadImageWarning), pytest.raises(TooManyBadFilesError) as info:
        for _ in _every_sample(dm.train_set):
            pass
    assert "3 unreadable image files (of 7), more than data.max_bad_files=2" in str(info.value)
    assert str(tmp_path / "data") in str(info.value) and "raise data.max_bad_files" in str(info.value)


# ---------------------------------------------------------------------------------------------- masks & seeds


def test_pretrain_batches_and_masks(tmp_path):
    _write_images(tmp_path / "data", 8)
    dm = _pretrain(tmp_path / "data", img_size=64, mask_patch_size=16, mask_ratio=0.6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == torch.int64
    assert batch["label"].tolist() == [-1] * 4
    cells = batch["mask"].reshape(4, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(4, 16, 16)  # [B, cell, 4x4 patch]
    assert (cells == cells[..., :1]).all()  # every 16 px cell is masked or not as a whole
    assert cells[..., 0].sum(1).tolist() == [math.ceil(0.6 * 16)] * 4
    assert len({tuple(m.flatten().tolist()) for m in batch["mask"]}) == 4  # different masks per sample


def _epoch(dm: PretrainDataModule, epoch: int) -> list[dict]:
    dm.train_sampler.set_epoch(epoch)
    return list(dm.train_dataloader())


def test_same_seed_epoch_index_gives_same_sample_in_any_worker(tmp_path):
    _write_images(tmp_path / "data", 8)
    serial, parallel = _pretrain(tmp_path / "data", seed=3), _pretrain(tmp_path / "data", seed=3, num_workers=2)
    serial.setup(), parallel.setup()
    a, b = _epoch(serial, 1), _epoch(parallel, 1)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    order = list(serial.train_sampler)
    direct = serial.train_set[order[0]]
    assert torch.equal(direct["image"], a[0]["image"][0]) and torch.equal(direct["mask"], a[0]["mask"][0])
    assert order[0][1] == 1  # keys carry the epoch
    index = order[0][0]
    other_epoch = serial.train_set[(index, 2)]
    assert not torch.equal(other_epoch["image"], direct["image"])
    assert not torch.equal(other_epoch["mask"], direct["mask"])
    other_seed = _pretrain(tmp_path / "data", seed=4)
    other_seed.setup()
    assert not torch.equal(other_seed.train_set[(index, 1)]["mask"], direct["mask"])


def test_validation_split_has_fixed_crops_and_masks(tmp_path):
    _write_images(tmp_path / "data", 10)
    dm = _pretrain(tmp_path / "data", val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    first = next(iter(dm.val_dataloader()))
    dm.val_dataloader().sampler.set_epoch(5)  # Lightning sets epochs on val samplers too
    later = next(iter(dm.val_dataloader()))
    assert torch.equal(first["image"], later["image"]) and torch.equal(first["mask"], later["mask"])


# ---------------------------------------------------------------------------------------------- sampler


def test_sampler_shards_ranks_and_resumes_mid_epoch():
    ranks = [EpochSampler(103, 10, seed=1, rank=r, world_size=2) for r in range(2)]
    keys = [list(s) for s in ranks]
    assert len(keys[0]) == len(keys[1]) == len(ranks[0]) == 50  # 103 // (2 * 10) batches of 10 per rank
    assert not {i for i, _ in keys[0]} & {i for i, _ in keys[1]}
    ranks[0].set_epoch(1)
    assert [i for i, _ in ranks[0]] != [i for i, _ in keys[0]]
    assert {e for _, e in ranks[0]} == {1}

    ranks[0].skip_batches(3)
    assert list(ranks[0]) == list(ranks[0])[30:] != []  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="cannot skip 6 batches"):
        ranks[0].skip_batches(6)

    padded = [EpochSampler(103, 10, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    got = [[i for i, _ in s] for s in padded]
    assert len(got[0]) == len(got[1]) == 52 and set(got[0]) | set(got[1]) == set(range(103))
    with pytest.raises(ValueError, match="do not fill one batch of 64 on each of 2 ranks"):
        EpochSampler(100, 64, world_size=2, rank=1)


def test_lightning_fit_sets_epochs_and_skips_empty_validation(tmp_path):
    _write_images(tmp_path / "data", 8)
    dm = _pretrain(tmp_path / "data")

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.masks: dict[int, list] = {}

        def training_step(self, batch, batch_idx):
            self.masks.setdefault(self.current_epoch, []).append(batch["mask"].clone())
            return self.layer(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, batch_idx):
            raise AssertionError("no validation set was configured")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(probe, datamodule=dm)
    assert dm.train_sampler.epoch == 1 and len(probe.masks[0]) == len(probe.masks[1]) == 2
    assert not torch.equal(torch.cat(probe.masks[0]), torch.cat(probe.masks[1]))
    assert torch.equal(torch.cat(probe.masks[1]), torch.cat([b["mask"] for b in _epoch(dm, 1)]))


# ---------------------------------------------------------------------------------------------- classification


def test_classification_imagefolder_label_fraction_and_eval(tmp_path):
    for split, n in (("train", 10), ("val", 2)):
        for c, cls in enumerate(("ant", "bee", "cat")):
            _write_images(tmp_path / split / cls, n + c, start=100 * c)
    dm = ClassificationDataModule(tmp_path, img_size=32, batch_size=4, num_workers=0, label_fraction=0.3)
    assert dm.num_classes == 3 and dm.class_names == ["ant", "bee", "cat"]
    assert np.bincount(dm.source.labels[dm.train_indices]).tolist() == [3, 3, 4]  # round(0.3 * [10, 11, 12])
    full = ClassificationDataModule(tmp_path, img_size=32, num_workers=0)
    assert set(dm.train_indices) < set(full.train_indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and "mask" not in batch
    val = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in val) == 9 and dm.test_set is dm.val_set
    assert torch.equal(torch.cat([b["label"] for b in val]), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2]))
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(again["image"], val[0]["image"])
    bank = list(dm.train_eval_dataloader())
    assert torch.equal(torch.cat([b["label"] for b in bank]), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2]))
    assert np.array_equal(label_subset(np.array([0, 0, 1]), 0.1, 0), [0, 2])  # at least one per class


def test_classification_fashion_mnist(tmp_path):
    dm = ClassificationDataModule(img_size=32, batch_size=8, num_workers=0, label_fraction=0.01)
    assert dm.num_classes == 10 and len(dm.train_indices) == 600 and len(dm.val_source) == 10_000
    assert np.bincount(dm.source.labels[dm.train_indices]).tolist() == [60] * 10
    assert next(iter(dm.train_dataloader()))["image"].shape == (8, 3, 32, 32)
    test = next(iter(dm.test_dataloader()))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    grey = test["image"] * std[:, None, None] + mean[:, None, None]  # undo the ImageNet normalisation
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)


# ---------------------------------------------------------------------------------------------- user-given roots
# The real Fashion-MNIST files are installed in /usr/share/datasets/fashion-mnist (test_real_fashion_mnist_files):
# any fallback to them would be found here, so these tests see it.


def _fashion_idx(folder: Path, n: int = 12) -> Path:
    """A small Fashion-MNIST layout: the four idx files, ``n`` training and ``n // 2`` test images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    for split, k in (("train", n), ("t10k", n // 2)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:k])
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[:k])
    return folder


def _imagenette(root: Path, train: int = 6, val: int = 3) -> Path:
    """Imagenette's layout: root/{train,val}/<class>/*.png."""
    for s, (split, n) in enumerate((("train", train), ("val", val))):
        for c, cls in enumerate(("n01440764", "n02102040")):
            write_images(root / split / cls, n, seed=10 * s + c)
    return root


def test_given_root_is_never_swapped_for_the_default_fashion_mnist(tmp_path):
    images = write_images(tmp_path / "images", 4)
    cases = ((images, "holds none of the Fashion-MNIST idx files"), (tmp_path / "nowhere", "does not exist"))
    for root, what in cases:
        with pytest.raises(FileNotFoundError, match=re.escape(f"data.root={root} {what}")) as info:
            _pretrain(root, source="fashion_mnist")
        assert "data.source=auto" in str(info.value) or "data.root=null" in str(info.value)
        with pytest.raises(FileNotFoundError, match=re.escape(f"data.root={root} {what}")):
            ClassificationDataModule(root, "fashion_mnist", img_size=32, num_workers=0)
    assert "data.source=auto (or folder" in str(pytest.raises(FileNotFoundError, FashionMNIST, images).value)


def test_auto_source_reads_idx_folders_as_fashion_mnist_and_image_folders_as_images(tmp_path):
    idx = _fashion_idx(tmp_path / "fmnist")
    assert detect_source(idx) == "fashion_mnist"
    dm = _pretrain(idx, val_fraction=0.25)
    assert isinstance(dm.source, FashionMNIST) and dm.source.folder == idx and len(dm.source) == 12
    assert isinstance(_pretrain(write_images(tmp_path / "images", 6)).source, ImageFiles)
    (idx / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds not all Fashion-MNIST idx files \(missing: t10k-labels"):
        _pretrain(idx)


def test_pretrain_quickstart_trains_on_the_given_root_else_fashion_mnist(tmp_path):
    from simmim.cli.pretrain import build_datamodule
    from simmim.cli.recipes import load_recipe

    images = write_images(tmp_path / "unlabeled", 100)  # the README's command, as typed: recipe=quickstart data.root=
    dm = build_datamodule(load_recipe("pretrain", ["recipe=quickstart", f"data.root={images}"]), 4)
    assert isinstance(dm.source, ImageFiles) and len(dm.source) == 100 and len(dm.val_indices) == 1
    assert {Path(dm.source.name(i)).parent for i in range(100)} == {images}
    default = build_datamodule(load_recipe("pretrain", []), 4)  # unchanged: Fashion-MNIST from the Debian package
    assert isinstance(default.source, FashionMNIST)
    assert default.source.folder == Path("/usr/share/datasets/fashion-mnist") and len(default.source) == 60_000
    assert len(default.val_indices) == 600


@pytest.mark.parametrize("root", ["nowhere", "empty"])
def test_pretrain_cli_fails_on_a_missing_or_empty_root(tmp_path, capsys, root):
    from simmim.pretrain import main

    (tmp_path / "empty").mkdir()
    args = [f"data.root={tmp_path / root}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1", "reconstructions=0"]
    assert main(["recipe=quickstart", *args, "visualize_every_n_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / root) in err, err


@pytest.mark.parametrize("recipe", ["quickstart", "imagenette_cpu", "knn", "linear_probe"])
def test_finetune_recipes_read_the_given_root(tmp_path, recipe):
    from simmim.cli.finetune import build_datamodule
    from simmim.cli.recipes import load_recipe

    def datamodule(root: Path) -> ClassificationDataModule:  # as simmim.finetune builds it
        args = [f"recipe={recipe}", f"data.root={root}", "data.num_workers=0", "pretrained=x"]
        return build_datamodule(load_recipe("finetune", args))

    idx = _fashion_idx(tmp_path / "fmnist")
    dm = datamodule(idx)
    assert isinstance(dm.source, FashionMNIST) and dm.source.folder == idx and dm.val_source.folder == idx
    tree = _imagenette(tmp_path / "tree")
    dm = datamodule(tree)
    assert {Path(dm.source.name(i)).parents[1] for i in range(len(dm.source))} == {tree / "train"}
    assert {Path(dm.val_source.name(i)).parents[1] for i in range(len(dm.val_source))} == {tree / "val"}


def test_pretrain_validation_follows_the_root(tmp_path):
    from simmim.cli.pretrain import build_datamodule
    from simmim.cli.recipes import load_recipe

    root = _imagenette(tmp_path / "imagenette")
    base = ["recipe=imagenette_cpu", f"data.root={root}", "data.batch_size=4", "data.num_workers=0"]
    dm = build_datamodule(load_recipe("pretrain", base), 4)
    assert {Path(dm.source.name(i)).parents[1] for i in range(len(dm.source))} == {root / "train"}
    assert len(dm.val_source) == 6
    assert {Path(dm.val_source.name(i)).parents[1] for i in range(len(dm.val_source))} == {root / "val"}
    other = write_images(tmp_path / "other_val", 2)
    explicit = build_datamodule(load_recipe("pretrain", [*base, f"data.val_root={other}"]), 4)
    assert {Path(explicit.val_source.name(i)).parent for i in range(2)} == {other}  # an explicit val_root wins
    assert build_datamodule(load_recipe("pretrain", [*base, "data.val_root=null"]), 4).val_source is None
    beside = build_datamodule(load_recipe("pretrain", [*base, "data.val_fraction=0.25"]), 4)
    assert len(beside.val_source) == 6 and len(beside.val_indices) == 0  # val/ is the validation set: none held out
    split = build_datamodule(load_recipe("pretrain", [*base, "data.val_root=null", "data.val_fraction=0.25"]), 4)
    assert split.val_source is None and len(split.val_indices) == 3
    assert _pretrain(write_images(tmp_path / "flat", 8)).val_source is None  # no train/ + val/: no validation folder


IMAGENETTE = Path("/work/shared/data/imagenette2-224")


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="the Imagenette copy of this machine is not there")
def test_imagenette_recipe_default_data_is_unchanged():
    from simmim.cli.pretrain import build_datamodule
    from simmim.cli.recipes import load_recipe

    dm = build_datamodule(load_recipe("pretrain", ["recipe=imagenette_cpu"]), 4)
    for source, split in ((dm.source, "train"), (dm.val_source, "val")):
        on_disk = sum(1 for p in (IMAGENETTE / split).rglob("*") if p.is_file() and p.suffix.lower() == ".jpeg")
        assert len(source) == on_disk > 0
        assert {Path(source.name(i)).parents[1] for i in (0, len(source) - 1)} == {IMAGENETTE / split}


# ---------------------------------------------------------------------------------------------- helpful errors


def test_too_few_images_for_a_batch_names_real_keys_and_what_shrank_the_set(tmp_path):
    for c, cls in enumerate(("ant", "bee")):
        write_images(tmp_path / "train" / cls, 24, seed=c)
        write_images(tmp_path / "val" / cls, 2, seed=10 + c)
    dm = ClassificationDataModule(tmp_path, img_size=32, batch_size=16, num_workers=0, label_fraction=0.2)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "data.label_fraction=0.2 kept 10 of 48 images" in msg, msg
    assert "lower data.batch_size to at most 10, raise data.label_fraction, or add images" in msg
    assert "drop_last" not in msg  # not a key a user can set
    two = ClassificationDataModule(tmp_path, img_size=32, batch_size=8, num_workers=0, label_fraction=0.2, world_size=2)
    with pytest.raises(DataError, match="on each of 2 ranks .*lower data.batch_size to at most 5"):
        two.setup("fit")
    pretrain = _pretrain(tmp_path / "train", batch_size=32, val_fraction=0.5)
    with pytest.raises(DataError, match=r"data.val_fraction=0.5 held out 24 of 48 images.*at most 24, lower data.val"):
        pretrain.setup("fit")


def test_val_fraction_holds_out_at_least_one_image_and_never_all(tmp_path):
    images = write_images(tmp_path / "images", 21)
    assert len(_pretrain(images, val_fraction=0.01).val_indices) == 1  # 0.21 rounds to none: one image anyway
    assert len(_pretrain(images, val_fraction=0.99, batch_size=1).train_indices) == 1
    one = write_images(tmp_path / "one", 1)
    with pytest.raises(DataError, match=r"data.val_fraction=0.5 cannot split 1 image: add images, or set .*=0"):
        _pretrain(one, val_fraction=0.5, batch_size=1)
    for c, cls in enumerate(("ant", "bee")):
        write_images(tmp_path / "tree" / cls, 10 + c, seed=c)
    dm = ClassificationDataModule(tmp_path / "tree", img_size=32, num_workers=0, val_fraction=0.01, batch_size=4)
    assert len(dm.val_indices) == 1  # fine-tuning holds out the same way


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_file_unreadable_stops_once_each_was_tried(tmp_path, num_workers):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(20):
        (folder / f"bad{i:02d}.png").write_bytes(b"not a png")
    dm = _pretrain(folder, source="folder", batch_size=2, num_workers=num_workers)
    with warnings.catch_warnings(), pytest.raises(TooManyBadFilesError) as info:
        warnings.simplefilter("ignore", BadImageWarning)
        next(iter(dm.train_dataloader()))
    err = info.value
    assert isinstance(err, DataError) and dm.num_bad_files == 20  # each file tried once, in any worker
    lines = str(err).strip().splitlines()
    assert err.summary == lines[-1].removeprefix("simmim.data.errors.TooManyBadFilesError: ")
    if num_workers:  # PyTorch re-raised it from the worker: the sentence is the last line
        assert lines[0].startswith("Caught TooManyBadFilesError in DataLoader worker process")
    assert err.summary.startswith("all 20 training image files were tried and every one is unreadable, e.g. ")
    assert str(folder / "bad00.png") in err.summary and "and 17 more: fix or delete them" in err.summary
    if not num_workers:  # with workers, a file found by another worker is named without its reason
        assert f"{folder / 'bad00.png'} (UnidentifiedImageError: " in err.summary


def test_max_bad_files_zero_names_the_key(tmp_path):
    _write_images(tmp_path / "data", 3)
    (tmp_path / "data" / "zz_empty.png").write_bytes(b"")
    dm = _pretrain(tmp_path / "data", batch_size=1, max_bad_files=0)
    dm.setup("fit")
    expected = r"1 unreadable image file \(of 4\), more than data.max_bad_files=0, e.g. .*zz_empty.png \(empty file\)"
    with pytest.raises(TooManyBadFilesError, match=expected + ": fix or delete them, or raise data.max_bad_files"):
        for _ in _every_sample(dm.train_set):
            pass


def test_file_list_with_missing_files_fails_up_front(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("imgs/img000.jpg\nimgs/img001.jpg\nimgs/img002.jpg\n")  # relative to the list's folder: wrong
    first = re.escape(str(lst.parent / "imgs" / "img000.jpg"))
    with pytest.raises(FileNotFoundError, match=rf"none of the 3 listed files exist \(first: {first}, line 1\)"):
        _pretrain(lst, batch_size=1)
    lst.write_text("../imgs/img000.jpg\n../imgs/img001.jpg\n../imgs/missing.jpg\n../imgs/img002.jpg\n")
    some = r"1 of the 4 listed files does not exist \(first: .*missing.jpg \(line 3\)\): fix or remove those lines"
    with pytest.raises(FileNotFoundError, match=some):
        _pretrain(lst, batch_size=1)


def test_workers_start_after_opencv_ran_in_this_process(tmp_path):
    # A worker forked while this process's OpenCV thread pool is alive used to block forever in its
    # cv2.setNumThreads(1): run in a subprocess so that a regression fails on the timeout instead of hanging.
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import write_images
from simmim.data import ClassificationDataModule

root = Path({str(tmp_path)!r})
for split, n in (("train", 10), ("val", 2)):
    for c, cls in enumerate(("ant", "bee", "cat")):
        write_images(root / split / cls, n, seed=c)
kw = dict(img_size=32, batch_size=4)
here = ClassificationDataModule(root, num_workers=0, **kw)
for _ in range(2):
    list(here.train_dataloader()), list(here.val_dataloader())  # OpenCV transforms in this process
forked = ClassificationDataModule(root, num_workers=2, **kw)
print(len(list(forked.train_dataloader())), len(list(forked.val_dataloader())))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["7", "2"]
