"""Which images train, validate and test: seeded splits, label subsets, and the ImageNet-style layout rules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simmim.data.errors import DataError
from simmim.data.shards import is_shard_root, split_root
from simmim.data.storage import is_url

__all__ = [
    "check_split",
    "held_out",
    "label_subset",
    "require_labels",
    "split_indices",
    "subfolder",
    "train_folder",
    "val_folder",
]

Root = str | os.PathLike | None


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) split of ``range(size)``: ``round(val_fraction * size)`` validation items, but at
    least one and never all (a small folder with the recipe's 1% still validates on one image)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 0x5A11]).permutation(size)
    n_val = min(max(1, round(val_fraction * size)), size - 1) if val_fraction else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_split(size: int, val_fraction: float) -> None:
    """Fail when ``val_fraction`` asks for a validation split of fewer than two images."""
    if val_fraction and size < 2:
        raise DataError(
            f"data.val_fraction={val_fraction} cannot split {size} image: add images, or set data.val_fraction=0 "
            "to train without validation"
        )


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a class-balanced deterministic subset: ``max(1, round(fraction * n_c))`` of each class c.

    Subsets are nested: the 10% subset is contained in the 20% one (same per-class order), which keeps
    label-efficiency curves comparable.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must lie in (0, 1], got {fraction}")
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        keep.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(keep))


def require_labels(source, root: Root) -> None:
    """Classification needs labels: said first, before any missing validation split."""
    if (source.labels < 0).any():
        raise ValueError(
            f"{source!r} from {root} has no labels: classification needs an ImageFolder tree (one subfolder per "
            "class) or a file list with a label on every line"
        )


def subfolder(root: Root, name: str) -> Path | str | None:
    """``root/name`` when it is a folder (or, for a URL root, when it holds shards)."""
    if root is not None and is_url(root):
        return split_root(root, name)
    if root is None or not Path(root).is_dir() or not (Path(root) / name).is_dir():
        return None
    return Path(root) / name


def held_out(val_fraction: float, n_val: int, size: int) -> tuple[str, str]:
    return f"data.val_fraction={val_fraction} held out {n_val} of {size} images", "lower data.val_fraction"


def val_folder(root: Root, source: str) -> Path | None:
    """``root/val`` when the root has the ImageNet layout (``train`` and ``val``) that ``train_folder`` follows."""
    if source in ("auto", "folder", "imagefolder", "shards") and subfolder(root, "train") is not None:
        return subfolder(root, "val")
    return None


def train_folder(root: Root, source: str) -> Root:
    """``root/train`` when an ImageFolder-style root holds one (ImageNet layout), else ``root``."""
    if source in ("auto", "folder", "imagefolder", "shards"):
        if source == "shards" and root is not None and is_shard_root(root):
            return root  # the manifest is here: this is the set, whatever subfolders it has
        return subfolder(root, "train") or root
    return root
