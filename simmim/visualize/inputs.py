"""Images to look at: from a data module, from files, and SimMIM models from checkpoints."""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path, PosixPath, WindowsPath
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
    """A SimMIM model (eval mode, CPU) from a pretraining Lightning checkpoint, or from any torch file holding
    ``{"state_dict": SimMIM state dict, "model_config": {"model": name, ...}}``; also returns the data settings
    stored with it (``img_size``, ``mask_patch_size``, ``mask_ratio``, ``mean``, ``std``, and ``datamodule``: all
    the datamodule's hyper-parameters, to rebuild it) when it has them."""
    from simmim.models.simmim import build_simmim

    path = Path(path)
    if not path.is_file():
        raise VisualizeError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        raise VisualizeError(
            f"{path} is an exported encoder: it has no pixel decoder, so it cannot reconstruct. "
            "Pass the pretraining checkpoint instead (runs/<recipe>/<name>/checkpoints/last.ckpt)"
        )
    if not zipfile.is_zipfile(path):
        raise VisualizeError(f"{path} is not a PyTorch checkpoint (torch.save / Lightning .ckpt file)")
    try:
        # safe loading; paths are allowed since a datamodule's hyper-parameters may hold its root as a Path
        with torch.serialization.safe_globals([PosixPath, WindowsPath]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a checkpoint we can read
        raise VisualizeError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    obj = obj if isinstance(obj, dict) else {}
    hp = obj.get("hyper_parameters", obj)
    cfg, sd = hp.get("model_config"), obj.get("state_dict")
    if not isinstance(cfg, dict) or "model" not in cfg or not isinstance(sd, dict):
        raise VisualizeError(
            f"{path} is not a SimMIM checkpoint: expected a pretraining .ckpt (python -m simmim.pretrain) or a "
            "file with 'state_dict' and 'model_config' (with its 'model' name)"
        )
    cfg = dict(cfg)
    name = cfg.pop("model")
    norm_target = hp.get("norm_target", cfg.pop("norm_target", False))
    nt_patch = hp.get("norm_target_patch_size", cfg.pop("norm_target_patch_size", 47))
    try:
        model = build_simmim(name, norm_target=norm_target, norm_target_patch_size=nt_patch, **cfg)
    except (TypeError, ValueError) as e:
        raise VisualizeError(f"{path}: cannot build the model from its model_config {cfg}: {e}") from e
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        what = "; ".join(
            f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise VisualizeError(f"{path}: its weights do not fit a SimMIM {name}: {what}")
    data = dict(obj.get("datamodule_hyper_parameters") or {})
    info: dict[str, Any] = {
        k: data[k] for k in ("img_size", "mask_patch_size", "mask_ratio", "mean", "std") if k in data
    }
    info.setdefault("img_size", cfg.get("img_size"))
    if data:
        info["datamodule"] = data
    return model.eval(), info


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
