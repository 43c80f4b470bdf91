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

from simmim.data.datamodule import ClassificationDataModule, PretrainDataModule
from simmim.data.datasets import ImageFiles, SampleDataset, build_source, detect_source
from simmim.data.errors import BadImageWarning, DataError, TooManyBadFilesError, show_bad_images_plainly
from simmim.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, read_idx
from simmim.data.images import IMG_EXTENSIONS, BadImageError, open_image
from simmim.data.sampler import EpochSampler
from simmim.data.splits import check_split, label_subset, split_indices
from simmim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SampleTransform,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    rand_augment,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BadImageError",
    "BadImageWarning",
    "show_bad_images_plainly",
    "ClassificationDataModule",
    "DataError",
    "EpochSampler",
    "FashionMNIST",
    "ImageFiles",
    "PretrainDataModule",
    "SampleDataset",
    "SampleTransform",
    "TooManyBadFilesError",
    "build_source",
    "check_split",
    "detect_source",
    "eval_transform",
    "finetune_transform",
    "label_subset",
    "open_image",
    "pretrain_transform",
    "rand_augment",
    "read_idx",
    "split_indices",
]
