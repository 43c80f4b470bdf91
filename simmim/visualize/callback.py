"""Reconstruction grids of fixed images during pretraining, as a Lightning callback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from simmim.models.simmim import SimMIM
from simmim.visualize.grid import save_reconstruction_grid
from simmim.visualize.inputs import input_normalisation, sample_images
from simmim.visualize.reconstruction import fixed_masks

__all__ = ["ReconstructionGridCallback"]


class ReconstructionGridCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the start and end of training), reconstruct a FIXED set
    of images with FIXED masks, save ``reconstructions/step_XXXXXX.png`` in the run folder and log the grid
    to the loggers (TensorBoard ``add_image``, or any logger with ``log_image``). Rank 0 only.

    ``images_or_datamodule_val``: a normalised image tensor [N, 3, H, W], a datamodule, or None for the
    trainer's datamodule; from a datamodule the first ``num_images`` validation images (training images when
    there is no validation set) are taken once, with their masks when the batches carry them. Otherwise masks
    are drawn once from ``seed`` with ``mask_patch_size`` / ``mask_ratio``. ``mean`` / ``std`` (of the input
    normalisation) default to the datamodule's, else ImageNet's. The pretraining module must expose its
    :class:`SimMIM` as ``.model``.
    """

    def __init__(
        self,
        images_or_datamodule_val: torch.Tensor | Any = None,
        every_n_steps: int = 500,
        num_images: int = 8,
        seed: int = 0,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dirpath: str | Path | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.source = images_or_datamodule_val
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.mean, self.std = mean, std
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self._last_step = -1

    def _collect(self, trainer: Any, model: SimMIM) -> None:
        source = trainer.datamodule if self.source is None else self.source
        if source is None:
            raise ValueError(
                "ReconstructionGridCallback needs images: pass a tensor or a datamodule, or fit with a datamodule"
            )
        if isinstance(source, torch.Tensor):
            images, masks = source[: self.num_images], None
        else:
            images, masks = sample_images(source, self.num_images)
        mean, std = input_normalisation(None if isinstance(source, torch.Tensor) else source)
        self.mean, self.std = tuple(self.mean or mean), tuple(self.std or std)
        self.images = images.detach().float().cpu()
        if masks is None:
            size = self.images.shape[-1]
            masks = fixed_masks(
                len(self.images), size, model.patch_size, self.mask_patch_size, self.mask_ratio, self.seed
            )
        self.masks = masks.cpu()

    def _folder(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"

    def log_grid(self, trainer: Any, pl_module: Any) -> None:
        """Write the grid for the current global step (once per step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        model: SimMIM = pl_module.model
        if self.images is None:
            self._collect(trainer, model)
        path = self._folder(trainer) / f"step_{step:06d}.png"
        grid = save_reconstruction_grid(model, self.images, self.masks, path, self.mean, self.std, title=f"step {step}")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("reconstructions", grid, step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # e.g. W&B
                logger.log_image(key="reconstructions", images=[grid], step=step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.log_grid(trainer, pl_module)
