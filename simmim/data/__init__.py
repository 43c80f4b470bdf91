"""Data pipeline: image sources, albumentations transforms, seeded sampling, LightningDataModules.

Layouts a ``root`` may have (``source="auto"`` picks the first that fits):

- ``None`` or ``"fashion_mnist"``: Fashion-MNIST from its idx files, looked up in ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``) then ``~/.cache/simmim/fashion-mnist``. A folder holding the idx files
  (``fashion_mnist``) is read from there; a given root is never swapped for a default location, so a root without
  them fails with ``source="fashion_mnist"`` and is read as images with ``source="auto"``.
- a ``.txt`` file list (``filelist``): one image path per line, relative to the list's folder, optionally followed by
  a label (integer or class name) after a tab or a space.
- an ImageFolder tree (``imagefolder``): ``root/<class>/**/<image>``, chosen when ``root`` holds subfolders and no
  images of its own; labels are the indices of the sorted class names.
- a plain folder (``folder``): every image below ``root``, searched recursively, unlabelled (label -1).

A root with a ``train`` subfolder (ImageNet layout) trains on ``root/train`` (and pretraining validates on
``root/val`` when there is one). A file list whose files do not exist fails up front. Image files are recognised by
extension (case-insensitive; hidden files skipped), read with ``open_image`` (any mode -> RGB, EXIF orientation
applied); unreadable files are skipped with a warning and replaced by another sample, up to ``max_bad_files``.
Problems found once training runs raise ``DataError`` (``TooManyBadFilesError`` is one) with a one-line message.
All randomness (crop, flip, RandAugment, erasing, mask) is derived from (seed, epoch, sample index).
"""

import importlib
from typing import Any

# what lives where: imported on first use, so that `import simmim.data.errors` (the command lines, before a recipe
# is checked) does not load Lightning
_WHERE = {
    "ClassificationDataModule": "simmim.data.datamodule",
    "PretrainDataModule": "simmim.data.datamodule",
    "ImageFiles": "simmim.data.datasets",
    "SampleDataset": "simmim.data.datasets",
    "build_source": "simmim.data.datasets",
    "detect_source": "simmim.data.datasets",
    "BadImageWarning": "simmim.data.errors",
    "DataError": "simmim.data.errors",
    "TooManyBadFilesError": "simmim.data.errors",
    "show_bad_images_plainly": "simmim.data.errors",
    "FASHION_MNIST_CLASSES": "simmim.data.fashion_mnist",
    "FashionMNIST": "simmim.data.fashion_mnist",
    "read_idx": "simmim.data.fashion_mnist",
    "IMG_EXTENSIONS": "simmim.data.images",
    "BadImageError": "simmim.data.images",
    "open_image": "simmim.data.images",
    "EpochSampler": "simmim.data.sampler",
    "check_split": "simmim.data.splits",
    "label_subset": "simmim.data.splits",
    "split_indices": "simmim.data.splits",
    "IMAGENET_MEAN": "simmim.data.transforms",
    "IMAGENET_STD": "simmim.data.transforms",
    "SampleTransform": "simmim.data.transforms",
    "eval_transform": "simmim.data.transforms",
    "finetune_transform": "simmim.data.transforms",
    "pretrain_transform": "simmim.data.transforms",
    "rand_augment": "simmim.data.transforms",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'simmim.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
