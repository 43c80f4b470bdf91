"""Training-safety pieces shared by pretraining and fine-tuning: crash-safe checkpoint files, finding the
checkpoint to resume from, and a guard against non-finite losses and gradients (fp16 NaNs: SimMIM#15, Swin#82)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import TQDMProgressBar

from simmim.checkpoint import atomic_torch_save, remove_stale_temporaries
from simmim.config import RecipeError
from simmim.distributed import sharding_strategy

__all__ = [
    "AtomicCheckpointIO",
    "latest_checkpoint",
    "prepare_run_folder",
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
        atomic_torch_save(checkpoint, path)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (None when there is none)."""
    folder = Path(folder)
    ckpts = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def prepare_run_folder(run_dir: str | Path, new_run: bool, what_to_do: str) -> None:
    """Before a run writes to ``run_dir``: refuse a new run where ``checkpoints/`` holds an earlier run's (it would
    overwrite them; ``what_to_do`` says what instead), and remove the temporary files of saves killed mid-write."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    earlier = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if new_run and earlier:
        listed = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise RecipeError(f"run folder {run_dir} already holds checkpoints of an earlier run ({listed}): {what_to_do}")
    for folder in (run_dir, ckpt_dir):
        remove_stale_temporaries(folder)


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
