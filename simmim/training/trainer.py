"""The Lightning Trainer of a run: loggers, checkpoints written atomically, the NaN guard, one progress bar for the
run, the recipe's ``trainer.*`` arguments, and Lightning's output reduced to what helps.

``trainer.*`` takes any Trainer argument. Ours are defaults the user can override: ``trainer.logger=false`` (no
loggers), ``trainer.callbacks=[...]`` (added to ours: import paths or ``{_target_: ..., arg: ...}``),
``trainer.enable_checkpointing=false`` (no checkpoints: nothing to resume from), ``trainer.default_root_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import TorchCheckpointIO

from simmim.errors import RecipeError
from simmim.io import save_torch
from simmim.training.callbacks import NonFiniteGuard, RunProgressBar
from simmim.training.strategy import build_strategy

__all__ = ["AtomicCheckpointIO", "build_trainer", "make_loggers", "quiet_lightning", "log_every_n_steps"]

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, fsynced, then renamed over the target.

    A kill or a crash during a save leaves the previous file intact (Lightning's default also renames, via an
    fsspec transaction, but first pickles the whole checkpoint into memory and never fsyncs)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_torch(checkpoint, path)


def make_loggers(names: Sequence[str], run_dir: Path, experiment: str) -> list[Any]:
    """The recipe's ``logger`` list: TensorBoard and CSV under ``run_dir/logs/version_N`` (one version per launch,
    so a resume adds one), MLflow (``MLFLOW_TRACKING_URI``, else a file store in ``run_dir/mlruns``) and W&B
    (offline unless ``WANDB_MODE=online``: files under ``run_dir/wandb``)."""
    import os

    logs = run_dir / "logs"
    version = f"version_{sum(1 for p in logs.glob('version_*'))}"
    out: list[Any] = []
    for name in names:
        if name == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(run_dir, name="logs", version=version, default_hp_metric=False))
        elif name == "csv":
            from pytorch_lightning.loggers import CSVLogger

            out.append(CSVLogger(logs, name=version, version="csv"))  # logs/version_N/csv/metrics.csv
        elif name == "mlflow":
            from pytorch_lightning.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out.append(MLFlowLogger(experiment_name=experiment, run_name=f"{run_dir.name}-{version}", tracking_uri=uri))
        elif name == "wandb":
            from pytorch_lightning.loggers import WandbLogger

            offline = os.environ.get("WANDB_MODE", "offline") != "online"
            out.append(WandbLogger(project=experiment, name=run_dir.name, save_dir=str(run_dir), offline=offline))
        else:
            raise RecipeError(f"logger: unknown {name!r}; choose from {', '.join(LOGGERS)}")
    return out


def _user_callbacks(items: Any) -> list[pl.Callback]:
    """``trainer.callbacks``: import paths (``pkg.module.Class``) or ``{_target_: ..., **kwargs}`` mappings."""
    from hydra.utils import instantiate

    out = []
    for item in items or []:
        spec = {"_target_": item} if isinstance(item, str) else dict(item)
        try:
            callback = instantiate(spec)
        except Exception as e:
            raise RecipeError(
                f"trainer.callbacks: cannot build {spec.get('_target_')!r}: {str(e).splitlines()[0]}"
            ) from e
        if not isinstance(callback, pl.Callback):
            raise RecipeError(f"trainer.callbacks: {spec.get('_target_')!r} is not a Lightning Callback")
        out.append(callback)
    return out


def build_trainer(
    run_dir: Path,
    trainer_args: Mapping[str, Any],
    *,
    loggers: Sequence[Any],
    checkpoints: Sequence[pl.Callback],
    callbacks: Sequence[pl.Callback] = (),
    nan_policy: str = "auto",
    images_per_step: Callable[[], int] | None = None,
) -> pl.Trainer:
    """A Trainer over ``run_dir`` with our loggers, ``checkpoints`` (ModelCheckpoint callbacks), the NaN guard, one
    run-level progress bar and the atomic checkpoint writer; ``trainer_args`` (the recipe's, precision and run
    length resolved) override them. Lightning's refusals become one-line :class:`RecipeError`s."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    args = dict(trainer_args)
    user_logger = args.pop("logger", None)
    if user_logger is False:
        loggers = []
    elif user_logger not in (None, True):
        raise RecipeError(f"trainer.logger={user_logger!r}: use true or false, and the recipe's logger list to choose")
    own = [NonFiniteGuard(nan_policy), *callbacks, *_user_callbacks(args.pop("callbacks", None))]
    if args.get("enable_checkpointing", True):
        own = [*checkpoints, *own]
    if args.get("enable_progress_bar", True):
        own.append(RunProgressBar(images_per_step))
    args.setdefault("enable_model_summary", False)  # one line of ours instead (its FLOPs column reads 0 here)
    args.setdefault("default_root_dir", run_dir)
    args["strategy"] = build_strategy(args.get("strategy", "auto"))
    try:
        return pl.Trainer(
            logger=list(loggers),
            callbacks=own,
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,  # the data modules' samplers shard and seed themselves
            **args,
        )
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise RecipeError(f"trainer: {' '.join(str(e).split())}") from e


def log_every_n_steps(trainer: pl.Trainer, steps_per_epoch: int, total_steps: int) -> None:
    """Never log less often than once an epoch and ten times a run: a short run still logs ``lr`` and
    ``train/grad_norm`` (Lightning logs only every ``log_every_n_steps``)."""
    trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps_per_epoch, max(1, total_steps // 10)))


class _DropLines(logging.Filter):
    def __init__(self, starts: Sequence[str]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip("💡 ").startswith(self.starts)


# Lightning's lines that say nothing a simmim run does not say better (or that are about hardware it does not use)
_NOISE_LINES = (
    "Tip:", "TPU available", "HPU available", "Using bfloat16 Automatic", "Using 16-bit Automatic",
    "`Trainer(limit_train_batches=1.0)`", "`Trainer(limit_val_batches=1.0)`", "`Trainer.fit` stopped",
    "You are using a CUDA device", "LOCAL_RANK:", "Restoring states from", "Restored all states",
)  # fmt: skip
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"The number of training batches .* is smaller than the logging interval",
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before",
    r"Total length of `.*` across ranks is zero",
    r".*does not have many workers which may be a bottleneck",
    r"Precision .* is not supported by the model summary",
    r"The '.*_dataloader' does not have many workers",
    r"Experiment logs directory .* exists and is not empty",
    r"The dirpath has changed from",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Around a fit: Lightning's noise off (tips, TPU lines, deprecation and resume warnings that do not apply to
    our runs: the samplers skip what a mid-epoch resume has seen); its useful lines and our warnings stay."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    # rank_zero_info logs on the rank_zero child loggers, which a parent's filter never sees
    loggers = [logging.getLogger(n + suffix) for n in names for suffix in ("", ".utilities.rank_zero")]
    drop = _DropLines(_NOISE_LINES)
    handlers = {h for lg in loggers for h in lg.handlers}
    for lg in loggers:
        lg.addFilter(drop)
    for h in handlers:
        h.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
        for h in handlers:
            h.removeFilter(drop)
