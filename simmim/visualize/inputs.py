"""Images to look at: from a data module, from files, and SimMIM models from checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmim.data import IMG_EXTENSIONS, BadImageError, BadImageWarning, eval_transform, open_image
from simmim.data.images import is_image_file
from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simmim.models.simmim import SimMIM

__all__ = ["VisualizeError", "input_normalisation", "sample_images", "load_simmim", "load_images"]


class VisualizeError(ValueError):
    """A checkpoint or image the CLI cannot use; the message names the file and what to do."""


def input_normalisation(datamodule: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a datamodule's input normalisation (its hyper-parameters), else ImageNet's."""
    hp = getattr(datamodule, "hparams", {})
    return tuple(hp.get("mean") or IMAGENET_MEAN), tuple(hp.get("std") or IMAGENET_STD)


def sample_images(datamodule: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` validation samples of ``datamodule`` (training samples when it has no validation set):
    images [n, 3, H, W] and their masks when the samples carry them (else None).

    Samples are read from the dataset by index, so the training sampler's state (exact resume) is left alone.
    """
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from torch.utils.data import default_collate

    try:
        loader = datamodule.val_dataloader()
    except MisconfigurationException:  # the datamodule defines no validation loader
        loader = []
    if not loader:
        loader = datamodule.train_dataloader()
    dataset = loader.dataset
    if len(dataset) == 0:
        raise ValueError(f"{type(datamodule).__name__} has no images for the reconstruction grid")
    batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
    return batch["image"], batch.get("mask")


def load_simmim(path: str | Path) -> tuple[SimMIM, dict[str, Any]]:
    """A SimMIM model (eval mode, CPU) from any checkpoint :func:`simmim.io.read_pretrained` reads that holds one
    whole (a pretraining Lightning checkpoint, ``{"state_dict": SimMIM state dict, "model_config": {"model": name,
    ...}}``, an official or HF SimMIM export); also returns the data settings stored with it (``img_size``,
    ``mask_patch_size``, ``mask_ratio``, ``mean``, ``std``, and ``datamodule``: all the datamodule's
    hyper-parameters, to rebuild it) when it has them."""
    from simmim.io import CheckpointError, read_pretrained, simmim_from_weights

    try:
        weights = read_pretrained(path)
        model = simmim_from_weights(weights)
    except CheckpointError as e:
        raise VisualizeError(str(e)) from None
    data = dict(weights.meta.get("datamodule_hyper_parameters") or {})
    info: dict[str, Any] = {
        k: data[k] for k in ("img_size", "mask_patch_size", "mask_ratio", "mean", "std") if k in data
    }
    info.setdefault("img_size", weights.config.get("img_size"))
    if data:
        info["datamodule"] = data
    return model, info


def load_images(
    paths: Sequence[str | Path],
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_images: int | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Image files, or folders searched recursively for images, resized (shorter side) and centre-cropped to
    ``img_size`` and normalised: ([N, 3, img_size, img_size], the files in order), at most ``max_images``.

    Unreadable files are skipped with a ``BadImageWarning``, as pretraining does; ``VisualizeError`` only when
    no readable image is left."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name))
            if not found:
                raise VisualizeError(f"folder {p} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise VisualizeError(f"image {p} does not exist")
    transform = eval_transform(img_size, resize_ratio=1.0, mean=mean, std=std)
    images: list[torch.Tensor] = []
    used: list[Path] = []
    bad: list[BadImageError] = []
    for f in files:
        if max_images is not None and len(images) >= max_images:
            break  # read no more than shown: a large folder stays quick
        try:
            image = open_image(f)
        except BadImageError as e:
            bad.append(e)
            continue
        images.append(transform(image=np.asarray(image))["image"])
        used.append(f)
    reasons = [(e.path, " ".join(e.reason.split())) for e in bad]  # one line each: the CLI prints lines
    if not images:
        if len(bad) == 1:
            raise VisualizeError(f"cannot read image {reasons[0][0]}: {reasons[0][1]}")
        few = "; ".join(f"{path} ({reason})" for path, reason in reasons[:3]) + (" ..." if len(bad) > 3 else "")
        raise VisualizeError(
            f"cannot read images: none of the {len(bad)} image files is readable ({few}): fix or replace them"
        )
    for path, reason in reasons:
        warnings.warn(f"skipping unreadable image {path}: {reason}", BadImageWarning, stacklevel=2)
    return torch.stack(images), used
