"""Fashion-MNIST from its original idx files: the quickstart's data, which needs nothing from the user."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIRS", "FashionMNIST", "find_fashion_mnist", "read_idx"]

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
