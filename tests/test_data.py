"""simmim.data on real files written to tmp_path (and the real Fashion-MNIST idx files)."""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import (
    BadImageError,
    BadImageWarning,
    ClassificationDataModule,
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
from simmim.data import datasets as datasets_module


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
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_DIRS", (tmp_path / "cache",))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "elsewhere")


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
    assert "3 unreadable image files, more than max_bad_files=2" in str(info.value)
    assert str(tmp_path / "data") in str(info.value)


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
