"""What every training module shares: the lr scaling rule, the one step-counting rule, the lr schedule, gradient
clipping, lr logging, ZeRO, and exact resume.

* Steps: an epoch has ``batches // accumulate_grad_batches`` optimizer steps; the batches that cannot fill a whole
  accumulation at the end of an epoch are dropped (every optimizer step averages the same number of images).
* lr, warmup lr and min lr are per 512 images, scaled by ``batch_size x world size x accumulation / 512``.
* Schedule: ``schedule.epochs`` sets the run; ``schedule.steps`` sets it in optimizer steps instead, the schedule
  laid over them in the proportions ``epochs``, ``warmup_epochs`` and ``milestones`` give.
* Exact resume: checkpoints record where the data stream stands (epoch, batches done, images per loader step) and
  each rank's CPU generator; a resume tells the data module's ``train_sampler`` (an ``EpochSampler``) to skip the
  batches already seen and continues every rank's generator (drop path), so it sees what an uninterrupted run saw.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from simmim.errors import RecipeError
from simmim.training.optim import LRSchedule, build_scheduler, check_max_steps, clip_gradients, scale_lr
from simmim.training.strategy import (
    gather_rng_states,
    rescale_position,
    seed_rank,
    shard_optimizer,
    shard_train_sampler,
)
from simmim.training.trainer import log_every_n_steps

__all__ = ["TrainingModule"]

# recipe keys of a run's lr schedule, by hyper-parameter section: a resume with other values warns
SCHEDULE_KEYS = {"schedule": ("name", "epochs", "steps", "warmup_epochs", "milestones", "gamma"),
                 "optim": ("lr", "warmup_lr", "min_lr", "layer_decay")}  # fmt: skip
LEGACY_FLAT = {k: f"{section}.{k}" for section, keys in SCHEDULE_KEYS.items() for k in keys if k != "name"}


class TrainingModule(pl.LightningModule):
    """Base of the pretraining and classification modules.

    Subclasses save ``optim`` and ``schedule`` (recipe sections as dicts) and ``batch_size`` (images per device and
    step; None: the datamodule's) as hyper-parameters and implement :meth:`make_optimizer`.
    """

    resumed_step: int | None = None  # the global step of the checkpoint a fit resumed from
    _rng_state: torch.Tensor | None = None

    # ---- to implement -----------------------------------------------------------------------------------------
    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimizer at peak ``lr`` (already scaled to the total batch), its groups' lrs as their peaks."""
        raise NotImplementedError

    # ---- steps and lr -------------------------------------------------------------------------------------------
    def total_batch(self) -> int:
        """Images per optimizer step over all devices: batch x world size x accumulation (the lr scaling)."""
        batch = self.hparams.get("batch_size") or getattr(self.trainer.datamodule, "batch_size", None)
        if not batch:
            raise ValueError(f"{type(self).__name__} needs batch_size (or a datamodule with .batch_size) to scale lr")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def loader_batch(self) -> int:
        """Images per loader step over all processes (the data position in checkpoints counts these)."""
        return self.total_batch() // self.trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch: whole accumulations only (:meth:`on_train_batch_start` drops the rest)."""
        self.trainer.fit_loop.setup_data()  # sizes the train loader (num_training_batches), also under max_steps
        batches, accumulate = self.trainer.num_training_batches, self.trainer.accumulate_grad_batches
        if batches < accumulate:
            raise RecipeError(
                f"trainer.accumulate_grad_batches={accumulate} is more than the {batches} batches of an epoch: "
                "lower it (or data.batch_size), or add images"
            )
        return batches // accumulate

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1 and batch_idx >= self.trainer.num_training_batches // accumulate * accumulate:
            return -1  # a partial accumulation at the epoch's end: end the epoch instead of stepping on it
        return None

    def log_lr(self) -> None:
        """``lr``: the highest group lr (the head's under layer-wise decay), every step."""
        lr = max(g["lr"] for g in self.optimizers().param_groups)
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=True)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # after the datamodule's setup, with the process group up
            shard_train_sampler(self.trainer)

    def lr_schedule(self) -> LRSchedule:
        """The run's schedule in optimizer steps (:attr:`hparams` ``schedule`` and ``optim``)."""
        o, s = self.hparams.optim, self.hparams.schedule
        total = self.total_batch()
        epoch_steps = self.steps_per_epoch()
        per_epoch: float = s["steps"] / s["epochs"] if s.get("steps") else epoch_steps
        steps = round(s["epochs"] * per_epoch)
        check_max_steps(self.trainer.max_steps, steps, s["epochs"], s.get("steps"))
        log_every_n_steps(self.trainer, epoch_steps, steps)
        return LRSchedule(
            total_steps=max(1, steps),
            warmup_steps=round(s["warmup_epochs"] * per_epoch),
            warmup_lr=scale_lr(o["warmup_lr"], total),
            min_lr=scale_lr(o["min_lr"], total),
            name=s.get("name", "cosine"),
            milestones=tuple(round(m * per_epoch) for m in s.get("milestones", ())),
            gamma=s.get("gamma", 0.1),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(scale_lr(self.hparams.optim["lr"], self.total_batch()))
        if self.hparams.optim.get("zero"):
            optimizer = shard_optimizer(optimizer, self.trainer)
        scheduler = build_scheduler(optimizer, self.lr_schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- exact resume ---------------------------------------------------------------------------------------------
    @staticmethod
    def schedule_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The lr schedule's settings in ``hparams`` (these or a checkpoint's), by recipe key."""
        out = {}
        for section, keys in SCHEDULE_KEYS.items():
            values = hparams.get(section) or {}
            out.update({f"{section}.{k}": values[k] for k in keys if k in values})
        # fine-tuning checkpoints before simmim 0.2 kept them flat
        out.update({key: hparams[flat] for flat, key in LEGACY_FLAT.items() if key not in out and flat in hparams})
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Where the data stream stands: epoch and batches done in it (the current one included when saving at a
        # batch end), so a resume continues with the same batches, augmentations and masks.
        trainer = self.trainer
        loop = trainer.fit_loop
        epochs, done = loop.epoch_progress.current, loop.epoch_loop.batch_progress.current.processed
        epoch = epochs.processed
        if epochs.processed == epochs.started:  # between epochs, e.g. saved after fit
            accumulate = trainer.accumulate_grad_batches
            if 0 < done < trainer.num_training_batches // accumulate * accumulate:
                # fit stopped inside that epoch (trainer.max_steps), which Lightning counts as finished: mark it
                # unfinished, as in a mid-epoch checkpoint, so a resume continues inside it
                epoch -= 1
                checkpoint["epoch"] = int(epoch)
                progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
                for counts in progress.values():
                    counts["completed"] = counts["processed"] = counts["started"] - 1
            else:
                done = 0
        elif done >= trainer.num_training_batches:  # saved on the epoch's last batch
            epoch, done = epoch + 1, 0
        checkpoint["simmim"] = {
            "epoch": int(epoch),
            "batches_done": int(done),
            "loader_batch": self.loader_batch(),
            "torch_rng": gather_rng_states(trainer),  # one row per rank
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resumed_step = int(checkpoint.get("global_step", 0))
        saved, now = self.schedule_hparams(checkpoint.get("hyper_parameters", {})), self.schedule_hparams(self.hparams)
        text = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
        changed = [f"{k}={text(now[k])} (was {text(v)})" for k, v in sorted(saved.items()) if k in now and v != now[k]]
        if changed:  # keys new since the checkpoint's version are left out: they were not set then
            rank_zero_warn(f"resuming with another lr schedule than the checkpoint's: {', '.join(changed)}")
        state = checkpoint.get("simmim")
        if state is None:
            return
        done = rescale_position(state["batches_done"], state.get("loader_batch"), self.loader_batch())
        self._rng_state = state["torch_rng"]
        # Runs before the train loader is created (and iterated): tell the sampler where to start.
        sampler = getattr(self.trainer.datamodule, "train_sampler", None)
        if not (hasattr(sampler, "skip_batches") and hasattr(sampler, "set_epoch")):
            warnings.warn(
                "resuming without a datamodule whose train_sampler offers set_epoch() and skip_batches() "
                "(simmim.data's data modules do): the interrupted epoch restarts from its first batch",
                stacklevel=2,
            )
            return
        sampler.set_epoch(state["epoch"])
        sampler.skip_batches(done)

    def on_train_start(self) -> None:
        # drop path draws from the global generator: continue each rank's stream where the checkpoint left it
        seed_rank(self.trainer, self._rng_state)
        self._rng_state = None
