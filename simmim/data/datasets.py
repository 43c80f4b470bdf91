"""Image sources (folder, ImageFolder tree, file list, Fashion-MNIST) and the robust, seeded sample dataset.

A *source* knows where its images are and what their labels are: ``len(source)``, ``source.load(i)`` -> RGB PIL
image (may raise ``BadImageError``), ``source.name(i)`` (for messages), ``source.labels`` (int64, -1 when
unlabelled) and ``source.class_names``; optionally ``source.pixels(i, min_size)`` -> (H x W x 3 uint8 array, full
(width, height)), the fast path that may decode smaller (see ``images.decode_image``). ``SampleDataset`` turns a
source into training samples: it derives each sample's randomness from (seed, epoch, index), and replaces
unreadable files by other samples.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from simmim.data.errors import BadImageWarning, TooManyBadFilesError
from simmim.data.fashion_mnist import FashionMNIST, is_fashion_mnist_folder
from simmim.data.images import IMG_EXTENSIONS, BadImageError, decode_image, is_image_file, open_image
from simmim.data.scan import list_image_paths

__all__ = ["SOURCES", "ImageFiles", "SampleDataset", "build_source", "detect_source"]

SOURCES = ("auto", "folder", "imagefolder", "filelist", "fashion_mnist", "shards")
_LAYOUTS = (
    "a folder of images (searched recursively), an ImageFolder tree (one subfolder per class), "
    "a .txt file list (one path per line, optional label), a folder of Fashion-MNIST idx files, 'fashion_mnist', "
    "or shards written by `python -m simmim.data.pack` (a folder or s3:// gs:// http(s):// URL holding manifest.json)"
)


class ImageFiles:
    """Image files on disk with optional integer labels (-1 = unlabelled).

    Paths are kept in one numpy byte-string array (not a list of Python strings) so that forked DataLoader
    workers share them instead of copying them page by page as reference counts change.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], labels: Sequence[int] | None = None, class_names: Sequence[str] = ()
    ) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=bytes)
        self.labels = np.full(len(self.paths), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.class_names = list(class_names)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, listing_cache: str | os.PathLike | None = None) -> ImageFiles:
        """Every image under ``root`` (recursively, extensions case-insensitive, hidden entries skipped), unlabelled.

        ``listing_cache``: a folder where the listing is kept for the next start (see ``simmim.data.scan``)."""
        root = _existing(root, folder=True)
        found = list_image_paths(root, listing_cache)
        if not len(found):
            raise ValueError(
                f"no image files ({', '.join(IMG_EXTENSIONS)}, any case) found under {root} (searched recursively); "
                f"expected {_LAYOUTS}"
            )
        return cls._under(root, found)

    @classmethod
    def _under(cls, root: Path, relative: np.ndarray, labels=None, class_names: Sequence[str] = ()) -> ImageFiles:
        """From encoded paths relative to ``root``, joined in one numpy operation (1M ``Path`` objects take
        seconds)."""
        files = cls([], None, class_names)
        prefix = b"" if str(root) == "." else os.fsencode(os.path.join(root, ""))
        files.paths = np.char.add(prefix, relative) if len(relative) else np.zeros(0, "S1")
        files.labels = np.full(len(files.paths), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        return files

    @classmethod
    def from_imagefolder(cls, root: str | os.PathLike, listing_cache: str | os.PathLike | None = None) -> ImageFiles:
        """``root/<class>/**/<image>``: classes are the sorted subfolder names, labels their indices."""
        root = _existing(root, folder=True)
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"no class subfolders in {root}: an ImageFolder tree needs root/<class>/<images>")
        listed = list_image_paths(root, listing_cache)  # sorted bytes: each class's files form one sorted run
        loose = [p for p in listed if b"/" not in p]
        if loose:
            raise ValueError(
                f"{root} holds {len(loose)} images of its own (e.g. {os.fsdecode(loose[0])}) beside its class "
                "subfolders: an ImageFolder tree would leave them out. Move them into class folders, or use "
                "data.source=folder to read every image unlabelled"
            )
        paths, labels = [], []
        for label, name in enumerate(classes):
            prefix = os.fsencode(name) + b"/"
            begin, end = np.searchsorted(listed, [prefix, prefix[:-1] + b"0"])  # "0" follows "/": the run's end
            found = listed[begin:end]
            if not len(found):
                raise ValueError(
                    f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                    "remove it, or use source='folder' to ignore class subfolders"
                )
            paths.append(found)
            labels += [label] * len(found)
        return cls._under(root, np.concatenate(paths), labels, classes)

    @classmethod
    def from_filelist(cls, path: str | os.PathLike) -> ImageFiles:
        """A text file: one image path per line (relative to the file's folder, or absolute), optionally followed
        by a label (an integer or a class name) after a tab or a space; a path containing spaces needs a tab
        before its label. Blank lines and lines starting with ``#`` are ignored."""
        path = _existing(path)
        if path.is_dir():
            raise ValueError(
                f"data.source=filelist needs a .txt file list, but {path} is a folder: use data.source=auto (or "
                "folder / imagefolder) for a folder of images"
            )
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit("\t", 1) if "\t" in line else line.split()
            if len(parts) > 2:
                raise ValueError(f"{path}:{n}: cannot tell path from label in {line!r}: separate the label by a tab")
            entries.append((n, path.parent / parts[0].strip(), parts[1].strip() if len(parts) == 2 else None))
        if not entries:
            raise ValueError(f"file list {path} lists no images: expected one image path per line")
        given = [label is not None for _, _, label in entries]
        if any(given) and not all(given):
            n = entries[given.index(not given[0])][0]
            raise ValueError(f"{path}:{n}: some lines have a label and some do not: label every line or none")
        _check_listed_files_exist(path, entries)
        paths = [p for _, p, _ in entries]
        if not given[0]:
            return cls(paths)
        names = [label for _, _, label in entries]
        if all(_is_int(s) for s in names):
            labels = [int(s) for s in names]
            if min(labels) < 0:
                raise ValueError(f"{path}: negative label {min(labels)}: labels must be 0..num_classes-1")
            return cls(paths, labels, [str(i) for i in range(max(labels) + 1)])
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return cls(paths, [index[c] for c in names], classes)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def load(self, index: int) -> Image.Image:
        return open_image(os.fsdecode(self.paths[index]))

    def pixels(
        self, index: int, min_size: Callable[[int, int], tuple[int, int]] | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """The image as an RGB array and its full (width, height); see ``images.decode_image``."""
        path = os.fsdecode(self.paths[index])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadImageError(path, f"{type(err).__name__}: {err}") from err
        return decode_image(data, path, min_size=min_size)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} images, {len(self.class_names)} classes)"


def detect_source(root: str | os.PathLike | None) -> str:
    """``source="auto"``: fashion_mnist for None / "fashion_mnist" / a folder holding Fashion-MNIST idx files,
    filelist for a .txt file, imagefolder for a folder holding subfolders but no images at its top level, else
    folder."""
    if root is None or str(root) == "fashion_mnist":
        return "fashion_mnist"
    from simmim.data.shards import is_shard_root
    from simmim.data.storage import is_url

    if is_url(root) or is_shard_root(root):
        return "shards"
    root = _existing(root)
    if is_fashion_mnist_folder(root):
        return "fashion_mnist"
    if root.is_file():
        if root.suffix.lower() == ".txt":
            return "filelist"
        raise ValueError(f"data root {root} is a file but not a .txt file list; expected {_LAYOUTS}")
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    has_dirs = any(e.is_dir() for e in entries)
    has_images = any(e.is_file() and is_image_file(e.name) for e in entries)
    return "imagefolder" if has_dirs and not has_images else "folder"


def build_source(
    root: str | os.PathLike | None,
    source: str = "auto",
    train: bool = True,
    listing_cache: str | os.PathLike | None = None,
    shard_options: dict | None = None,
) -> ImageFiles | FashionMNIST:
    """The image source at ``root`` (``train`` picks the Fashion-MNIST split); clear errors for bad roots.

    ``listing_cache``: folder keeping folder listings between starts (``simmim.data.scan``); ``shard_options``:
    keyword arguments of ``ShardSource`` (cache folder and size) for ``source="shards"``."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    if source == "auto":
        source = detect_source(root)
    if source == "fashion_mnist":
        return FashionMNIST(None if root is None or str(root) == "fashion_mnist" else root, train=train)
    if root is None:
        raise ValueError(f"source={source!r} needs a root: {_LAYOUTS}")
    if source == "shards":
        from simmim.data.shards import ShardSource

        return ShardSource(root, **(shard_options or {}))
    if source == "filelist":
        return ImageFiles.from_filelist(root)
    if source == "imagefolder":
        return ImageFiles.from_imagefolder(root, listing_cache)
    return ImageFiles.from_folder(root, listing_cache)


def _existing(path: str | os.PathLike, folder: bool = False) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data root {path} does not exist; expected {_LAYOUTS}")
    if folder and not path.is_dir():
        raise NotADirectoryError(f"data root {path} is not a folder; expected {_LAYOUTS}")
    return path


def _check_listed_files_exist(path: Path, entries: list[tuple[int, Path, str | None]]) -> None:
    """Fail before training when listed files are missing: a wrong base folder would otherwise surface as
    thousands of "unreadable image" warnings mid-run."""
    missing = [(n, p) for n, p, _ in entries if not p.exists()]
    if not missing:
        return
    n, first = missing[0]
    if len(missing) == len(entries):
        raise FileNotFoundError(
            f"file list {path}: none of the {len(entries)} listed files exist (first: {first}, line {n}); "
            f"relative paths are read from the list's folder {path.parent}: fix the paths or move the list"
        )
    few = ", ".join(f"{p} (line {n})" for n, p in missing[:3]) + (" ..." if len(missing) > 3 else "")
    verb = "does" if len(missing) == 1 else "do"
    raise FileNotFoundError(
        f"file list {path}: {len(missing)} of the {len(entries)} listed files {verb} not exist (first: {few}): "
        "fix or remove those lines"
    )


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


class SampleDataset(Dataset):
    """Samples ``{"image", "label"[, "mask"]}`` of a source, with randomness from (seed, epoch, index).

    Keys are ``(index, epoch)`` pairs as yielded by ``EpochSampler`` (a plain int means epoch 0); ``fixed_epoch``
    pins the epoch (validation: the same crop and mask for a sample at every evaluation). ``indices`` selects a
    subset of the source (index i of the dataset is source item ``indices[i]``).

    A file that fails to decode is warned about once (``BadImageWarning``), recorded, and replaced by another
    sample: the search starts at an item drawn from (seed, epoch, index) and walks on through the dataset, so runs
    stay reproducible and the search ends once every file has been tried. The record lives in shared memory, so
    the count (``num_bad_files``) covers all DataLoader workers; beyond ``max_bad_files`` bad files, or when no
    readable file is left, ``TooManyBadFilesError`` says how many and names some of them.
    """

    def __init__(
        self,
        source: ImageFiles | FashionMNIST,
        transform: Callable[[Image.Image, np.random.SeedSequence], dict[str, torch.Tensor]],
        seed: int = 0,
        indices: Sequence[int] | None = None,
        max_bad_files: int = 100,
        fixed_epoch: int | None = None,
        split: str = "training",
    ) -> None:
        self.source = source
        self.split = split  # for messages: training, validation or test images
        self.transform = transform
        self.seed = seed
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
        self.max_bad_files = max_bad_files
        self.fixed_epoch = fixed_epoch
        # shared with forked/spawned workers: a byte per sample (1 = bad) and a count under one lock
        self._bad = multiprocessing.RawArray("b", len(self.indices))
        self._bad_count = multiprocessing.Value("q", 0)
        self.bad_files: dict[str, str] = {}  # this process's findings: name -> reason

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_bad_files(self) -> int:
        """Distinct unreadable files found so far, by any worker."""
        return self._bad_count.value

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        return self.sample(key)

    def sample(self, key: int | tuple[int, int], raw: bool = False) -> dict[str, torch.Tensor | int]:
        """Sample ``key``; ``raw``: as the transform's ``raw`` gives it when it has one (e.g. 8-bit images that a
        loader normalises per batch, after they crossed from the worker: 4x fewer bytes through shared memory)."""
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        seed = np.random.SeedSequence([self.seed, epoch, int(index)])
        # the transform may let the decoder return a smaller image (its crop drawn first from the full size)
        hint = self.transform.decode_hint(seed) if hasattr(self.transform, "decode_hint") else None
        item = int(index)
        loaded = self._load(item, hint)
        if loaded is None:
            # Every other item once, from a start drawn from (seed, epoch, index): a uniformly random replacement
            # that stays reproducible, and a search that ends once every file has been tried.
            size = len(self)
            start = int(np.random.default_rng([self.seed, epoch, int(index), 1]).integers(size))
            for step in range(size):
                item = (start + step) % size
                loaded = self._load(item, hint)
                if loaded is not None:
                    break
            else:
                key = {"training": "data.root", "validation": "data.val_root"}.get(self.split, "data.test_root")
                raise TooManyBadFilesError(
                    f"all {size} {self.split} image files were tried and every one is unreadable, e.g. "
                    f"{self._examples()}: fix or delete them, or point {key} at readable images"
                )
        image, full_size = loaded
        transform = self.transform.raw if raw and hasattr(self.transform, "raw") else self.transform
        sample = transform(image, seed) if hint is None else transform(image, seed, full_size)
        sample["label"] = int(self.source.labels[self.indices[item]])
        return sample

    def _load(self, item: int, hint=None) -> tuple[np.ndarray | Image.Image, tuple[int, int]] | None:
        """Item ``item``'s image and full size, or None when its file is (or was already found) unreadable."""
        if self._bad[item]:
            return None
        try:
            if hasattr(self.source, "pixels"):
                return self.source.pixels(int(self.indices[item]), hint)
            image = self.source.load(int(self.indices[item]))
            return image, image.size
        except BadImageError as err:
            self._record_bad(item, err)
            return None

    def _record_bad(self, item: int, err: BadImageError) -> None:
        name = self.source.name(int(self.indices[item]))
        with self._bad_count.get_lock():
            if self._bad[item]:
                return  # another worker got there first
            self._bad[item] = 1
            self._bad_count.value += 1
            count = self._bad_count.value
        self.bad_files[name] = " ".join(err.reason.split())  # one line: the message's last line is for the user
        if count > self.max_bad_files:
            files = "file" if count == 1 else "files"
            raise TooManyBadFilesError(
                f"{count} unreadable image {files} (of {len(self)}), more than data.max_bad_files="
                f"{self.max_bad_files}, e.g. {self._examples()}: fix or delete them, or raise data.max_bad_files"
            )
        warnings.warn(f"skipping unreadable image ({count} so far): {err}", BadImageWarning, stacklevel=4)

    def _examples(self, n: int = 3) -> str:
        """The first ``n`` unreadable files found by any worker, with the reason where this process knows it."""
        bad = np.flatnonzero(np.frombuffer(self._bad, np.int8))
        names = [self.source.name(int(self.indices[i])) for i in bad[:n]]
        text = "; ".join(f"{name} ({self.bad_files[name]})" if name in self.bad_files else name for name in names)
        return text + (f" and {len(bad) - n} more" if len(bad) > n else "")

    def __repr__(self) -> str:
        return f"SampleDataset({self.source!r}, {len(self)} samples, seed={self.seed}, transform={self.transform!r})"
