"""Lightning callbacks of both training kinds: the guard against non-finite losses and gradients (fp16 NaNs:
SimMIM#15, Swin#82), a progress display for the whole run, and the kNN monitor."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from simmim.data import ClassificationDataModule
from simmim.eval import Loader, find_encoder, knn_evaluate
from simmim.training.strategy import sharding_strategy

__all__ = [
    "KNNMonitor",
    "NonFiniteError",
    "NonFiniteGuard",
    "RunProgressBar",
    "latest_checkpoint",
]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (None when there is none)."""
    folder = Path(folder)
    ckpts = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


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


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole run, not one per epoch: optimizer steps done and left, the ETA, images per second, the
    epoch, loss and lr (scientific notation: Lightning's fixed 3 decimals show 4e-5 as 0.000), no logger version.
    A resumed run starts the bar where the checkpoint left off."""

    def __init__(self, images_per_step: Callable[[], int] | None = None, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._images_per_step = images_per_step
        self._start: tuple[float, int] | None = None

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            estimate = trainer.estimated_stepping_batches
            total = int(estimate) if math.isfinite(estimate) else None
        return total

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.init_train_tqdm()
        bar.reset(total=self._total_steps(trainer))
        bar.initial = bar.n = trainer.global_step
        bar.set_description("steps")
        self.train_progress_bar = bar
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the run: nothing to reset at an epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out = {k.removesuffix("_step"): v for k, v in items.items() if not k.endswith("_epoch")}
        out = {k: f"{v:.2e}" if k.split("/")[-1] == "lr" and isinstance(v, float) else v for k, v in out.items()}
        out["epoch"] = trainer.current_epoch
        if self._start is not None and self._images_per_step is not None:
            seconds, steps = time.perf_counter() - self._start[0], trainer.global_step - self._start[1]
            if seconds > 0 and steps > 0:
                out["img/s"] = f"{steps * self._images_per_step() / seconds:.0f}"
        return out


class KNNMonitor(pl.Callback):
    """Every ``every_n_epochs`` training epochs, kNN-evaluate the module's SwinV2 encoder and log
    ``knn/top1`` (and ``knn/top5``).

    ``train`` and ``val`` are DataLoaders of labelled dict batches with evaluation transforms, or callables
    returning one (called once, at the first evaluation). Every rank computes the same full result; the loaders
    are not sharded, so keep them small (a few thousand images).
    """

    def __init__(
        self,
        train: Loader | Callable[[], Loader],
        val: Loader | Callable[[], Loader],
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        num_classes: int | None = None,
        bf16: bool = False,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"KNNMonitor every_n_epochs must be >= 1, got {every_n_epochs}")
        self._train, self._val = train, val
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.num_classes = num_classes
        self.bf16 = bf16
        self.history: list[tuple[int, dict[str, float]]] = []

    @classmethod
    def from_datamodule(cls, make: Callable[[], ClassificationDataModule], **kwargs: Any) -> KNNMonitor:
        """A monitor over a labelled :class:`ClassificationDataModule` built by ``make()`` at the first
        evaluation: memory bank = its training images (evaluation transforms), queries = its validation set."""
        cache: dict[str, ClassificationDataModule] = {}

        def dm() -> ClassificationDataModule:
            if "dm" not in cache:
                cache["dm"] = make()
                cache["dm"].setup("fit")
            return cache["dm"]

        return cls(lambda: dm().train_eval_dataloader(), lambda: dm().val_dataloader(), **kwargs)

    @staticmethod
    def _loader(source: Loader | Callable[[], Loader]) -> Loader:
        is_factory = callable(source) and not hasattr(source, "__iter__")
        return source() if is_factory else source

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        self._train, self._val = self._loader(self._train), self._loader(self._val)
        result = knn_evaluate(
            find_encoder(pl_module), self._train, self._val, self.k, self.temperature, self.num_classes, self.bf16
        )
        self.history.append((trainer.current_epoch, result))
        for name, value in result.items():
            pl_module.log(f"knn/{name}", value, on_epoch=True, sync_dist=False, rank_zero_only=True)
