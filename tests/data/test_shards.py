"""Shards: packing (python -m simmim.data.pack), reading by index from a folder, over HTTP and from an S3-compatible
object store (moto's server on loopback), the shard-aware sampler order, the cache limit, bad samples, and
pretraining that streams from s3://, is killed with SIGKILL and resumes exactly."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_once_written, pretrain_args, write_images
from PIL import Image
from servers import HTTPServer, S3Server
from torch.utils.data import DataLoader

from simmim.data import (
    BadImageWarning,
    ClassificationDataModule,
    DataError,
    EpochSampler,
    ImageFiles,
    PretrainDataModule,
    SampleDataset,
    TooManyBadFilesError,
)
from simmim.data.pack import main as pack_main
from simmim.data.pack import pack
from simmim.data.shards import ShardPrefetcher, ShardSource
from simmim.data.storage import ShardCache, parse_size
from simmim.data.transforms import PretrainTransform
from simmim.masking import MaskGenerator


def _imagefolder(root: Path, per_class: int = 6, classes=("cat", "dog", "owl")) -> Path:
    for k, name in enumerate(classes):
        write_images(root / name, per_class, size=40, seed=k)
        for i, path in enumerate(sorted((root / name).glob("*.png"))):  # a mix of encodings, kept as they are
            if i % 2:
                Image.open(path).convert("RGB").save(path.with_suffix(".JPG"), quality=90)
                path.unlink()
    return root


def _rows(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "samples.tsv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """An ImageFolder (3 classes x 6 images, PNG and JPEG) packed into small shards."""
    tmp = tmp_path_factory.mktemp("packed")
    source = _imagefolder(tmp / "folder")
    pack(source, tmp / "shards", shard_size="12KB")
    return source, tmp / "shards"


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------------- pack


def test_pack_keeps_original_bytes_labels_and_writes_a_manifest(packed):
    source, out = packed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "simmim-shards" and manifest["num_samples"] == 18
    assert manifest["classes"] == ["cat", "dog", "owl"] and manifest["labels"] == "labels.npy"
    assert manifest["num_shards"] == len(manifest["shardlist"]) > 3
    assert sum(s["nsamples"] for s in manifest["shardlist"]) == 18
    assert manifest["encodings"] == {"png": 9, "jpg": 9}
    assert manifest["source"]["path"] == str(source) and manifest["source"]["unreadable"] == 0
    files = sorted(p for p in source.rglob("*") if p.is_file())
    assert manifest["num_bytes"] == sum(p.stat().st_size for p in files)
    rows, labels = _rows(out), np.load(out / "labels.npy")
    assert sorted(Path(r[2]) for r in rows) == files
    shards = ShardSource(out)
    assert len(shards) == 18 and shards.class_names == ["cat", "dog", "owl"]
    assert np.array_equal(shards.labels, labels)
    for i, (_, label, original) in enumerate(rows):
        assert shards.encoded(i) == Path(original).read_bytes()  # never re-encoded
        assert int(label) == labels[i] == ["cat", "dog", "owl"].index(Path(original).parent.name)
    # standard webdataset tar members: <key>.<ext> and <key>.cls; shuffled, so a shard mixes classes
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[0].endswith(".cls") and names[1].split(".")[1] in ("png", "jpg")
    assert len(set(labels[: len(labels) // 2])) > 1


def test_wids_reads_the_manifest_as_a_descriptor(packed):
    import wids

    _, out = packed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = wids.ShardListDataset(str(out / "manifest.json"), transformations=[lambda s: s])
    assert len(ds) == 18
    assert ds[5][".cls"].read().decode() == str(ShardSource(out).labels[5])


def test_pack_imagenet_layout_splits_and_fashion_mnist_as_png(tmp_path):
    root = tmp_path / "imagenet"
    _imagefolder(root / "train", 2)
    _imagefolder(root / "val", 1)
    assert pack_main([str(root), str(tmp_path / "out"), "--workers", "2", "--shard-size", "8KB"]) == 0
    assert ShardSource(tmp_path / "out" / "train").class_names == ["cat", "dog", "owl"]
    assert len(ShardSource(tmp_path / "out" / "train")) == 6 and len(ShardSource(tmp_path / "out" / "val")) == 3
    # Fashion-MNIST idx files (a tiny set): raw arrays stored as PNG, the same pixels once decoded
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for prefix, n in (("train", 7), ("t10k", 3)):
        with gzip.open(fashion / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes() + images[:n].tobytes())
        with gzip.open(fashion / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes() + np.arange(n, dtype=np.uint8).tobytes())
    pack(fashion, tmp_path / "fashion_shards", shuffle=False)
    train = ShardSource(tmp_path / "fashion_shards" / "train")
    manifest = train.manifest
    assert manifest["encodings"] == {"png": 7} and "PNG" in manifest["note"] and len(train.class_names) == 10
    for i in range(7):
        assert np.array_equal(train.pixels(i)[0], np.repeat(images[i][:, :, None], 3, axis=2))
    assert train.labels.tolist() == list(range(7)) and len(ShardSource(tmp_path / "fashion_shards" / "val")) == 3


def test_pack_cli_errors_name_the_problem(tmp_path, capsys, packed):
    assert pack_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error: data root" in capsys.readouterr().err
    assert pack_main([str(packed[0]), str(packed[1])]) == 2
    assert f"error: {packed[1]} already holds manifest.json" in capsys.readouterr().err
    assert pack_main([str(packed[0]), str(tmp_path / "o"), "--shard-size", "lots"]) == 2
    assert "error: size 'lots': write a number of bytes or e.g. 256MB" in capsys.readouterr().err
    assert parse_size("256MB") == 256_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(4096) == 4096


def test_a_file_unreadable_at_pack_time_is_left_out_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "imgs", 4)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")  # listed, cannot be read
    with pytest.warns(UserWarning, match="1 files could not be read and were left out"):
        pack(folder, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["source"]["unreadable"] == 1
    assert "gone.png" in manifest["source"]["unreadable_examples"][0]


# -------------------------------------------------------------------------------------------------- reading


def _folder_like(out: Path) -> ImageFiles:
    """The packed files, read from their original paths in shard order (index i is the same image)."""
    rows = _rows(out)
    return ImageFiles([r[2] for r in rows], [int(r[1]) for r in rows], ["cat", "dog", "owl"])


def test_shard_samples_equal_the_same_files_read_from_the_folder(packed):
    """Same index, seed and epoch: the same decoded pixels, crop, flip and mask, whichever way the file is read."""
    _, out = packed
    transform = PretrainTransform(32, mask_generator=MaskGenerator(32, 8, 4, 0.6))
    from_shards = SampleDataset(ShardSource(out), transform, seed=3)
    from_folder = SampleDataset(_folder_like(out), transform, seed=3)
    for key in [(i, epoch) for i in range(18) for epoch in (0, 2)]:
        a, b = from_shards[key], from_folder[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["label"] == b["label"]


def _shard_loader(out: Path, num_workers: int, rank: int = 0, world_size: int = 1, epoch: int = 1):
    dm = PretrainDataModule(
        out, "shards", img_size=32, mask_patch_size=8, batch_size=3, num_workers=num_workers,
        pin_memory=False, val_root=None, shard_window=2, rank=rank, world_size=world_size,
    )  # fmt: skip
    dm.setup("fit")
    dm.train_sampler.set_epoch(epoch)
    return dm, dm.train_dataloader()


def test_shard_order_is_seeded_disjoint_across_ranks_and_independent_of_workers(packed):
    _, out = packed
    source = ShardSource(out)
    dm, loader = _shard_loader(out, 0)
    batches = list(loader)
    _, loader2 = _shard_loader(out, 2)
    for b1, b2 in zip(batches, loader2, strict=True):
        assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["mask"], b2["mask"])
    # each epoch: every sample once (18 = 6 batches of 3), in a new order
    orders = []
    for epoch in (0, 1):
        dm.train_sampler.set_epoch(epoch)
        orders.append([i for i, _ in dm.train_sampler])
        assert sorted(orders[-1]) == list(range(18))
    assert orders[0] != orders[1]
    # two ranks: disjoint halves; each reads its shards a window (2 shards) at a time
    parts = []
    for rank in (0, 1):
        sampler = _shard_loader(out, 0, rank, 2)[0].train_sampler
        parts.append([i for i, _ in sampler])
        shards = source.shard_of(np.array(parts[-1]))
        switches = np.flatnonzero(np.diff(shards)) + 1
        for start in range(0, len(shards), 4):
            assert len(set(shards[start : start + 4])) <= 3  # never more than a window (+ the next) at once
        assert len(switches) < len(shards) - 1 or len(set(shards)) == 1
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) == len(parts[1]) == 9
    assert len(set(source.shard_of(np.array(parts[0]))) & set(source.shard_of(np.array(parts[1])))) <= 1


def test_sampler_groups_window_and_resume_skip():
    groups = [5, 3, 5, 5, 2]
    sampler = EpochSampler(20, 2, seed=4, groups=groups, window=2)
    sampler.set_epoch(3)
    full = [i for i, _ in sampler]
    sampler.skip_batches(4)
    assert [i for i, _ in sampler] == full[8:]
    starts = np.cumsum([0, *groups])
    shard = np.searchsorted(starts, full, side="right") - 1
    runs = [shard[0]]
    for s in shard[1:]:
        if s not in runs:
            runs.append(s)
    assert sorted(runs) == [0, 1, 2, 3, 4]  # shards visited in a permuted order, windows of 2
    first_window = set(runs[:2])
    boundary = max(k for k, s in enumerate(shard) if s in first_window)
    assert set(shard[: boundary + 1]) == first_window
    with pytest.raises(ValueError, match="groups must be positive sizes summing to size=20"):
        EpochSampler(20, 2, groups=[5, 5])


def test_bad_samples_in_shards_are_skipped_with_the_folder_rule(tmp_path):
    folder = write_images(tmp_path / "data", 6)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    pack(folder, tmp_path / "shards", shard_size="8KB")
    dm = PretrainDataModule(
        tmp_path / "shards", img_size=32, mask_patch_size=8, batch_size=1, num_workers=0, val_root=None
    )
    dm.setup("fit")
    loader = DataLoader(dm.train_set, batch_size=1, sampler=EpochSampler(9, 1, drop_last=False))
    with pytest.warns(BadImageWarning, match=r"skipping unreadable image \(1 so far\): cannot read image .*shard-"):
        batches = list(loader)
    assert len(batches) == 9 and dm.num_bad_files == 3
    assert all(".tar[" in name for name in dm.train_set.bad_files)
    assert "empty file" in dm.train_set.bad_files.values()
    strict = PretrainDataModule(
        tmp_path / "shards", img_size=32, mask_patch_size=8, batch_size=1, num_workers=0, val_root=None,
        max_bad_files=1,
    )  # fmt: skip
    strict.setup("fit")
    with pytest.warns(BadImageWarning), pytest.raises(TooManyBadFilesError, match="more than data.max_bad_files=1"):
        list(DataLoader(strict.train_set, batch_size=1, sampler=EpochSampler(9, 1, drop_last=False)))


def test_a_manifest_that_does_not_match_its_shards_is_a_data_error(tmp_path, packed):
    _, out = packed
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shardlist"][0]["nsamples"] += 1
    manifest["shardlist"][1]["nsamples"] -= 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard-000000.tar holds .* samples, manifest.json says .*re-run pack"):
        ShardSource(copy).encoded(0)
    with pytest.raises(FileNotFoundError, match=r"holds no manifest.json: with data.source=shards"):
        ShardSource(tmp_path)


# ------------------------------------------------------------------------------------------ remote + cache


def test_http_shards_are_cached_once_and_read_like_local_ones(tmp_path, packed):
    _, out = packed
    server = HTTPServer(out)
    try:
        remote = ShardSource(server.url, cache_dir=tmp_path / "cache", cache_limit="1MB")
        local = ShardSource(out)
        assert len(remote) == len(local) and np.array_equal(remote.labels, local.labels)
        for i in range(len(local)):
            assert remote.encoded(i) == local.encoded(i)
        gets = [p for p in server.requests if p.endswith(".tar")]
        assert sorted(gets) == sorted(f"/{s['url']}" for s in local.manifest["shardlist"])  # each shard once
        again = ShardSource(server.url, cache_dir=tmp_path / "cache", cache_limit="1MB")
        for i in range(len(local)):
            again.encoded(i)
        assert len([p for p in server.requests if p.endswith(".tar")]) == len(gets)  # the cache served them
    finally:
        server.stop()


def test_cache_limit_evicts_least_recently_used_shards(tmp_path, packed):
    _, out = packed
    server = HTTPServer(out)
    try:
        source = ShardSource(out)
        sizes = [s["filesize"] for s in source.manifest["shardlist"]]
        limit = sizes[0] + sizes[1] + sizes[2]
        cache = ShardCache(tmp_path / "cache", limit)
        for shard in source.manifest["shardlist"]:
            cache.fetch(f"{server.url}/{shard['url']}", shard["filesize"])
            held = sorted(cache.folder.glob("*.tar"))
            assert sum(p.stat().st_size for p in held) <= limit
            assert cache.path(f"{server.url}/{shard['url']}").exists()
        names = {p.name.split("-", 1)[1] for p in cache.folder.glob("*.tar")}
        assert "shard-000000.tar" not in names and f"shard-{len(sizes) - 1:06d}.tar" in names
        with pytest.raises(DataError, match="data.cache_limit=1KB is smaller than one shard"):
            ShardSource(server.url, cache_dir=tmp_path / "c2", cache_limit="1KB")
        with pytest.raises(DataError, match=r"cannot download shard .*missing.tar: FileNotFoundError"):
            cache.fetch(f"{server.url}/missing.tar")
    finally:
        server.stop()


def test_prefetcher_downloads_in_the_order_the_epoch_reads(tmp_path, packed):
    _, out = packed
    server = HTTPServer(out)
    try:
        source = ShardSource(server.url, cache_dir=tmp_path / "cache")
        assert len(source.urls) >= 4
        order = [3, 3, 0, 0, 2, 2, 1]
        prefetcher = ShardPrefetcher(source, ahead=1)
        seen = list(prefetcher.follow(list(range(len(order))), np.array(order)))
        prefetcher._thread.join(timeout=30)
        assert seen == list(range(len(order))) and prefetcher.error is None
        fetched = [p.removeprefix("/") for p in server.requests if p.endswith(".tar")]
        assert fetched == [f"shard-{s:06d}.tar" for s in (3, 0, 2, 1)]
    finally:
        server.stop()


def test_both_data_modules_stream_from_s3(tmp_path, packed, s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    source, out = packed
    url = s3.upload(out, "modules", "imagenet/train")
    s3.upload(out, "modules", "imagenet/val")
    options = dict(cache_dir=tmp_path / "cache", cache_limit="10MB", shard_window=2, num_workers=1, pin_memory=False)
    pre = PretrainDataModule("s3://modules/imagenet", img_size=32, mask_patch_size=8, batch_size=3, **options)
    assert pre.source.root == url and pre.val_source.root == "s3://modules/imagenet/val"
    pre.setup("fit")
    batches = list(pre.train_dataloader())
    assert len(batches) == 6 and batches[0]["image"].shape == (3, 3, 32, 32)
    assert len(list(pre.val_dataloader())) == 6
    cls = ClassificationDataModule("s3://modules/imagenet", img_size=32, batch_size=4, **options)
    assert cls.num_classes == 3 and cls.class_names == ["cat", "dog", "owl"]
    cls.setup("fit")
    batch = next(iter(cls.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert 0 <= batch["label"].min() and batch["label"].max() < 3
    assert 0 < len(list((tmp_path / "cache").glob("*.tar"))) <= 2 * len(ShardSource(out).urls)  # train + val


# ------------------------------------------------------------------------- pretraining: kill -9 and resume


def _losses(run_dir: Path) -> dict[int, float]:
    """{global step: loss} of the run's last launch (CSV metrics)."""
    logs = sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(logs[-1] / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _args(root, run_dir, cache):
    return pretrain_args(
        root, run_dir, "data.source=shards", f"data.cache_dir={cache}", "data.cache_limit=2MB", "data.shard_window=2",
        "data.batch_size=4", "data.num_workers=1", "model.drop_path_rate=0.1", "trainer.max_steps=14",
        "schedule.epochs=3", "checkpoint.every_n_steps=3", "visualize_every_n_steps=0",
    )  # fmt: skip


@pytest.mark.slow
def test_pretraining_streams_from_s3_is_killed_and_resumes_with_the_same_losses(tmp_path, s3, monkeypatch):
    """The reference trains on the shards from a local folder; the other run streams the same shards from s3://
    (moto's server on loopback), is SIGKILLed once its first checkpoint exists and resumes with resume=auto:
    every loss equals the reference's."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    write_images(tmp_path / "images", 24)
    pack(tmp_path / "images", tmp_path / "shards", shard_size="12KB")
    assert len(ShardSource(tmp_path / "shards").urls) >= 4
    url = s3.upload(tmp_path / "shards", "pretrain", "data/images")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ref = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *_args(tmp_path / "shards", tmp_path / "ref", tmp_path / "c0")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = _args(url, tmp_path / "run", tmp_path / "cache")
    kill_once_written("simmim.pretrain", args, tmp_path / "run" / "checkpoints" / "step=000003.ckpt")
    assert list((tmp_path / "cache").glob("*.tar"))  # it was streaming from s3
    res = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *args, "resume=auto"], capture_output=True, text=True, timeout=300,
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    expected, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(expected) == list(range(14))
    assert 3 <= min(got) < 14 and max(got) == 13
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step
