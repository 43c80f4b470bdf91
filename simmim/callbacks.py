"""Training-safety pieces shared by pretraining and fine-tuning: crash-safe checkpoint files, finding the
checkpoint to resume from, exact resumes, and a guard against non-finite losses and gradients (fp16 NaNs:
SimMIM#15, Swin#82)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_warn

from simmim.config import RecipeError
from simmim.distributed import gather_rng_states, rescale_position, seed_rank, sharding_strategy
from simmim.io import CheckpointError, check_resume, remove_stale_temporaries, save_torch

__all__ = [
    "AtomicCheckpointIO",
    "ExactResume",
    "latest_checkpoint",
    "fit_context",
    "resolve_run_dir",
    "start_run",
    "NonFiniteError",
    "NonFiniteGuard",
    "ProgressBar",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, fsynced, then renamed over the target.

    A kill or a crash during a save leaves the previous file intact (Lightning's default also renames, via an
    fsspec transaction, but first pickles the whole checkpoint into memory and never fsyncs)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_torch(checkpoint, path)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (None when there is none)."""
    folder = Path(folder)
    ckpts = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def start_run(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Before a run writes to ``run_dir``: the checkpoint ``cfg.resume`` names (None: a new run); a new run is refused
    where ``checkpoints/`` holds an earlier run's (it would overwrite them), and temporary files of saves killed
    mid-write are removed. The checkpoint to resume from is checked first (:func:`simmim.io.check_resume`): a
    file that is no checkpoint, a truncated one or one of another model is refused in one line."""
    ckpt_dir = run_dir / "checkpoints"
    resume = _resolve_resume(cfg, ckpt_dir)
    if resume is not None:
        try:  # before Lightning unpickles it (a text file: "KeyError: 101"; another model: pages of size mismatches)
            kind = "finetune" if "mode" in cfg else "pretrain"
            check_resume(resume, OmegaConf.to_container(cfg.model, resolve=True), kind)
        except CheckpointError as e:
            raise RecipeError(f"resume={cfg.resume}: {e}") from None
    earlier = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if resume is None and earlier:
        listed = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise RecipeError(
            f"run folder {run_dir} already holds checkpoints of an earlier run ({listed}): pass resume=auto to "
            "continue it, or give another run_dir (or name) for a new run"
        )
    for folder in (run_dir, ckpt_dir):
        remove_stale_temporaries(folder)
    return resume


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``run_dir``, else ``output_dir/<recipe>/<name or timestamp>``; shared with DDP worker processes."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    inherited = os.environ.get("SIMMIM_RUN_DIR")
    if inherited:
        return Path(inherited)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.name:
        raise RecipeError("under a multi-process launcher give run_dir=PATH or name=NAME so every rank agrees")
    name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / str(cfg.recipe) / str(name)


def _resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to continue from (None: a new run)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        if not cfg.run_dir and not cfg.name:
            raise RecipeError("resume=auto looks in the run folder: give run_dir=PATH (or name=NAME) as well")
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            print(f"resume=auto: no checkpoint in {ckpt_dir}, starting from scratch")
        return found
    path = Path(cfg.resume)
    if not path.is_file():
        raise RecipeError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto or a .ckpt path)")
    return path


class ExactResume:
    """LightningModule mixin: a resume continues a run exactly, as if it had never stopped.

    Checkpoints record where the data stream stands (epoch, batches done in it, images per loader step) and each
    rank's CPU generator; a resume tells the data module's ``train_sampler`` (an ``EpochSampler``: its batches
    and each sample's augmentation follow from (seed, epoch, index)) to skip the batches already seen and continues
    every rank's generator (drop path). The module gives :meth:`loader_batch` and :meth:`schedule_hparams`.
    """

    resumed_step: int | None = None  # the global step of the checkpoint a fit resumed from
    _rng_state: torch.Tensor | None = None

    def loader_batch(self) -> int:
        """Images per loader step over all processes (the data position in checkpoints counts these)."""
        raise NotImplementedError

    def schedule_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The schedule's settings in ``hparams`` (these or a checkpoint's), by recipe key: a resume warns when
        they changed."""
        return {}

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
        changed = [f"{k}={now.get(k)} (was {saved[k]})" for k in sorted(saved) if saved[k] != now.get(k)]
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


@contextlib.contextmanager
def fit_context(run_dir: str | Path) -> Iterator[None]:
    """Around ``Trainer.fit`` of an :class:`ExactResume` module: DDP workers that Lightning starts (they re-run the
    command) find ``run_dir`` through ``SIMMIM_RUN_DIR`` (:func:`resolve_run_dir`), and Lightning's warnings that a
    mid-epoch resume is unreliable (the sampler skips the batches already seen) and that the checkpoint folder is not
    empty (a resume writes on in its run's folder; new runs are refused there), and its note on an empty validation
    set, stay quiet."""
    os.environ["SIMMIM_RUN_DIR"] = str(run_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            yield
    finally:
        os.environ.pop("SIMMIM_RUN_DIR", None)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step, the tensors and the last
    good checkpoint."""


def _nonfinite_grads(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


class NonFiniteGuard(pl.Callback):
    """Logs the total gradient norm (before clipping) as ``train/grad_norm`` and acts on non-finite values.

    ``policy``: ``stop`` raises :class:`NonFiniteError` before the optimizer step (no checkpoint with bad
    weights is ever written, the last good one stays on disk); ``skip`` drops the update (gradients set to None:
    the optimizer leaves weights and moments alone; the lr schedule still advances, as with GradScaler) and
    counts it in ``train/skipped_steps``; ``auto`` is ``skip`` under a GradScaler (16-mixed: it already skips
    overflowing steps and lowers its scale) and ``stop`` otherwise. Under a GradScaler non-finite gradients with
    a finite loss are the scaler's normal calibration and are always left to it.
    """

    def __init__(self, policy: str = "auto") -> None:
        if policy not in ("auto", "stop", "skip"):
            raise ValueError(f"nan_policy must be auto, stop or skip, got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self._bad_loss: float | None = None

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def resolved_policy(self, trainer: pl.Trainer) -> str:
        if self.policy != "auto":
            return self.policy
        return "skip" if self._scaler(trainer) is not None else "stop"

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float().item()
        if not math.isfinite(value) and self._bad_loss is None:
            self._bad_loss = value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # fused: one op per dtype
        if sharding_strategy(trainer.strategy) is not None:  # each process holds a shard of the gradients
            norm = trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        bad_loss, self._bad_loss = self._bad_loss, None
        finite = bool(torch.isfinite(norm))
        if finite and bad_loss is None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            return
        if bad_loss is None and self._scaler(trainer) is not None:
            return  # overflow in the scaled backward: GradScaler skips this step and lowers its scale
        if self.resolved_policy(trainer) == "skip":
            for p in pl_module.parameters():
                p.grad = None
            self.skipped += 1
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
            return
        names = _nonfinite_grads(pl_module)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        ckpt_cb = trainer.checkpoint_callback
        last = latest_checkpoint(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else None
        what = f"loss is {bad_loss}" if bad_loss is not None else "loss is finite"
        raise NonFiniteError(
            f"non-finite values at optimizer step {trainer.global_step} (epoch {trainer.current_epoch}): {what}; "
            f"gradient norm {norm.item()}; non-finite gradients in {len(names)} tensors"
            + (f" ({shown})" if names else "")
            + ". Training stopped before this update; last good checkpoint: "
            + (str(last) if last else "none written yet")
            + ". Try precision=bf16-mixed, a lower optim.lr, or nan_policy=skip"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class ProgressBar(TQDMProgressBar):
    """Lightning's bar with learning rates in scientific notation (its fixed 3 decimals show 4e-5 as 0.000) and
    without the logger version (``v_num``), which means nothing here: each launch logs to its own folder."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k: f"{v:.2e}" if k.split("/")[-1] == "lr" and isinstance(v, float) else v for k, v in items.items()}
