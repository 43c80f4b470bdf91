"""What an export starts from: the weights of a run folder, a ``.ckpt``, an ``encoder.safetensors`` (or any file
or export folder :func:`simmim.io.read_pretrained` reads), what kind of model they make, and where they come from
(recipe, data, steps, final loss or top-1) for the model card."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmim.io import CheckpointError, PretrainedWeights, full_config, geometry_of, read_pretrained

__all__ = ["ExportError", "Source", "read_source"]


class ExportError(ValueError):
    """A source or an output the export cannot use; the message names it and what to do instead."""


@dataclass
class Source:
    """Weights to export, their complete model config, and their story."""

    path: Path  # what the user gave
    weights: PretrainedWeights
    config: dict[str, Any]  # every constructor argument, "model" = the named config when there is one
    class_names: list[str] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    crop_pct: float | None = None  # the evaluation's centre crop (fine-tuned models)
    recipe: dict[str, Any] | None = None
    steps: int | None = None
    final_loss: float | None = None
    top1: tuple[float, str] | None = None  # (accuracy in percent, split)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """simmim (encoder, mask token, pixel decoder), classifier (encoder and head) or encoder."""
        return self.weights.kind

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the input images."""
        size = self.config["img_size"]
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    @property
    def num_classes(self) -> int:
        head = self.weights.state_dict.get("head.weight")
        return int(head.shape[0]) if head is not None else 0


def _run_folder(file: Path) -> Path | None:
    """The run folder a checkpoint or encoder file sits in (it holds recipe.yaml), if any."""
    folder = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    return folder if (folder / "recipe.yaml").is_file() else None


def _last_train_loss(run: Path) -> float | None:
    """The last ``train/loss`` of the newest launch's CSV log (logs/version_N/csv/metrics.csv)."""
    versions = sorted((run / "logs").glob("version_*/csv/metrics.csv"), key=lambda p: int(p.parts[-3].split("_")[1]))
    if not versions:
        return None
    with open(versions[-1]) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return losses[-1] if losses else None


def read_source(source: str | Path, trust_checkpoint: bool = False) -> Source:
    """Read ``source`` (see the module docstring) and gather what the model card says about it."""
    from omegaconf import OmegaConf

    path = Path(source)
    weights = read_pretrained(path, trust_checkpoint)
    recorded = weights.config or geometry_of(weights.state_dict)
    config = full_config(recorded)
    if config is None:
        raise CheckpointError(f"{path} records the model {recorded.get('model')!r}, which is not a known config")
    config.pop("num_classes", None)
    src = Source(path, weights, config, class_names=weights.meta.get("class_names"))
    if not weights.config:
        src.notes.append("the source records no model config: geometry read from the weights, image and window "
                         f"size defaulted ({config['img_size']} px, window {config['window_size']})")  # fmt: skip
    provenance = weights.meta.get("provenance") or {}
    file = Path(weights.path)
    run = _run_folder(file) if file.is_file() else None
    src.recipe = provenance.get("recipe")
    if src.recipe is None and run is not None:
        src.recipe = OmegaConf.to_container(OmegaConf.load(run / "recipe.yaml"), resolve=True)
    steps = weights.meta.get("global_step", provenance.get("steps"))
    src.steps = int(steps) if steps is not None else None
    loss = provenance.get("final_loss")
    if loss is None and run is not None and src.kind != "classifier":
        loss = _last_train_loss(run)
    src.final_loss = float(loss) if loss is not None else None
    if run is not None and (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
        top1 = (metrics.get("test") or {}).get("top1")
        if top1 is not None:
            src.top1 = (float(top1), str(metrics.get("test_split", "test")))
        if src.steps is None and metrics.get("steps") is not None:
            src.steps = int(metrics["steps"])
    data = {**((src.recipe or {}).get("data") or {}), **provenance}
    data.update(weights.meta.get("datamodule_hyper_parameters") or {})
    if data.get("mean") is None or data.get("std") is None:
        from simmim.data import IMAGENET_MEAN, IMAGENET_STD  # the data modules' default (an import of Lightning)

        data.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    src.mean, src.std = tuple(data["mean"]), tuple(data["std"])
    if data.get("eval_resize_ratio"):  # fine-tuning's evaluation crop
        src.crop_pct = 1.0 / float(data["eval_resize_ratio"])
    if src.kind == "classifier" and not src.class_names:
        src.class_names = [f"class_{i}" for i in range(src.num_classes)]
        src.notes.append("the source records no class names: labels are class_0 ... class_N")
    return src
