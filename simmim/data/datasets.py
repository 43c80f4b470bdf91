"""Image sources (folder, ImageFolder tree, file list, Fashion-MNIST) and the robust, seeded sample dataset.

A *source* knows where its images are and what their labels are: ``len(source)``, ``source.load(i)`` -> RGB PIL
image (may raise ``BadImageError``), ``source.name(i)`` (for messages), ``source.labels`` (int64, -1 when
unlabelled) and ``source.class_names``; optionally ``source.pixels(i, min_size)`` -> (H x W x 3 uint8 array, full
(width, height)), the fast path that may decode smaller (see ``images.decode_image``). ``SampleDataset`` turns a
source into training samples: it derives each sample's randomness from (seed, epoch, index), and replaces
unreadable files by other samples.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from simmim.data.images import IMG_EXTENSIONS, BadImageError, decode_image, is_image_file, open_image
from simmim.data.scan import list_image_paths

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "SOURCES",
    "BadImageWarning",
    "show_bad_images_plainly",
    "DataError",
    "FashionMNIST",
    "ImageFiles",
    "SampleDataset",
    "TooManyBadFilesError",
    "build_source",
    "detect_source",
    "read_idx",
]

SOURCES = ("auto", "folder", "imagefolder", "filelist", "fashion_mnist", "shards")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# searched when no root is given: the Debian package `dataset-fashion-mnist`, then the user cache
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("~/.cache/simmim/fashion-mnist").expanduser())
_FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_NAMES = tuple(n for pair in _FASHION_FILES.values() for n in pair)
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


class FashionMNIST:
    """Fashion-MNIST from its four idx files (gzipped or raw): 60k train / 10k test 28x28 greyscale images,
    returned as RGB (the grey value repeated) so that the same models and normalisation apply.

    ``root``: the folder holding the files; None searches ``FASHION_MNIST_DIRS``. A given root is never replaced
    by a default location: without the files there, this fails (the user meant *that* folder).
    """

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True) -> None:
        folder = find_fashion_mnist(root)
        self.folder = folder
        images_name, labels_name = _FASHION_FILES[train]
        self.images = read_idx(_idx_file(folder, images_name))
        self.labels = read_idx(_idx_file(folder, labels_name)).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(
                f"{folder}: {images_name} {self.images.shape} does not match {labels_name} "
                f"{self.labels.shape}: expected [N, 28, 28] images and N labels"
            )
        self.split = "train" if train else "test"
        self.class_names = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return f"fashion-mnist {self.split}[{index}]"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], "L").convert("RGB")

    def pixels(self, index: int, min_size=None) -> tuple[np.ndarray, tuple[int, int]]:
        grey = self.images[index]
        return np.repeat(grey[:, :, None], 3, axis=2), (grey.shape[1], grey.shape[0])

    def __repr__(self) -> str:
        return f"FashionMNIST({self.split}, {len(self)} images from {self.folder})"


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """``root`` when it holds all four idx files (raw or .gz); with no root, the first of ``FASHION_MNIST_DIRS``
    that does. A given root without them is an error, never a silent switch to a default location."""
    if root is not None and str(root) != "fashion_mnist":
        folder = Path(root).expanduser()
        defaults = " or ".join(map(str, FASHION_MNIST_DIRS))
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise FileNotFoundError(
                f"data.root={folder} {what}: with data.source=fashion_mnist it must be the folder holding the "
                f"Fashion-MNIST idx files ({', '.join(_FASHION_NAMES)}, raw or .gz); data.root=null reads them "
                f"from {defaults}"
            )
        missing = [n for n in _FASHION_NAMES if not _idx_file(folder, n, must_exist=False)]
        if missing:
            found = "none of the" if len(missing) == len(_FASHION_NAMES) else "not all"
            raise FileNotFoundError(
                f"data.root={folder} holds {found} Fashion-MNIST idx files (missing: {', '.join(missing)}, raw or "
                ".gz). For a folder of images use data.source=auto (or folder / imagefolder / filelist); for "
                f"Fashion-MNIST put the files there, or set data.root=null to read them from {defaults}"
            )
        return folder
    for folder in FASHION_MNIST_DIRS:
        if all(_idx_file(folder, n, must_exist=False) for n in _FASHION_NAMES):
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {', '.join(map(str, FASHION_MNIST_DIRS))}: install it with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        f"{', '.join(n + '.gz' for n in _FASHION_NAMES)} (from https://github.com/zalandoresearch/fashion-mnist, "
        f"folder data/fashion) into {FASHION_MNIST_DIRS[-1]} or into a folder given as data.root"
    )


def is_fashion_mnist_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds any Fashion-MNIST idx file (an incomplete set then fails with what is missing)."""
    folder = Path(folder)
    return folder.is_dir() and any(_idx_file(folder, n, must_exist=False) for n in _FASHION_NAMES)


def _idx_file(folder: Path, name: str, must_exist: bool = True) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if must_exist:
        raise FileNotFoundError(f"{folder / name}(.gz) not found")
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format: 0, 0, type code, ndim, big-endian int32 dims, data); gzip allowed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an idx file (bad magic {data[:4].hex()}; expected 0000 08 0N for uint8)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but its header {dims} of {dtype} implies {expected}: truncated?")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def detect_source(root: str | os.PathLike | None) -> str:
    """``source="auto"``: fashion_mnist for None / "fashion_mnist" / a folder holding Fashion-MNIST idx files,
    filelist for a .txt file, imagefolder for a folder holding subfolders but no images at its top level, else
    folder."""
    if root is None or str(root) == "fashion_mnist":
        return "fashion_mnist"
    from simmim.data.shards import is_shard_root, is_url

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


class BadImageWarning(UserWarning):
    """An unreadable image was skipped and replaced by another sample."""


def show_bad_images_plainly() -> None:
    """For command lines: print each :class:`BadImageWarning` as one ``warning: ...`` line, without the Python
    source line that the default format adds (set before DataLoader workers start, so they inherit it)."""
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, BadImageWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


class DataError(ValueError):
    """A data problem found once training runs (too few images for a batch, too many unreadable files), with a
    one-line message saying what to change.

    Raised in a DataLoader worker, it reaches the main process re-raised by PyTorch as the same class with the
    message "Caught ... Original Traceback ...": the user's sentence is then the last line (after
    ``module.Class: ``); :attr:`summary` returns that sentence in both cases. The class takes a single message
    string, so PyTorch can re-create it.
    """

    @property
    def summary(self) -> str:
        """The one-line message for the user, also when PyTorch re-raised this from a DataLoader worker."""
        lines = str(self).strip().splitlines()
        line = lines[-1] if lines else ""
        for prefix in (f"{type(self).__module__}.{type(self).__qualname__}: ", f"{type(self).__qualname__}: "):
            line = line.removeprefix(prefix)
        return line


class TooManyBadFilesError(DataError, RuntimeError):
    """More than ``max_bad_files`` unreadable images, or no readable image left (a RuntimeError too, as before)."""


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
