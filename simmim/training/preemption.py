"""Preemption: SIGTERM, or SIGUSR1 (what SLURM sends before it kills a job), saves a checkpoint and ends the run.

The signal only sets a flag; at the next optimizer step every process agrees (any rank signalled), the checkpoint is
written as ``last.ckpt`` (the exact-resume state, mid-epoch included) and the fit stops; the command line then says
how to continue (``resume=auto``). Under SLURM, SIGUSR1 also requeues the job (``scontrol requeue``), as Lightning's
auto-requeue does: the requeued job reruns the same command, whose ``resume=auto`` continues where this one stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["Preemption", "PREEMPTION_SIGNALS"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(pl.Callback):
    """Save ``checkpoint`` and stop at the first optimizer step after SIGTERM or SIGUSR1 (see the module docstring).

    :attr:`signal` names the signal that stopped the run (None: not preempted), :attr:`step` the step saved."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signal: str | None = None
        self.step: int | None = None
        self.requeued = False
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's own handlers (installed when fit starts): its SIGTERM handling raises at the next
        # epoch end without saving anything
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        received = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        if not received or self.signal is not None:
            return
        signum = self._received or signal.SIGTERM
        self.signal, self.step = signal.Signals(signum).name, trainer.global_step
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        rank_zero_info(f"{self.signal} received: saved {self.checkpoint} at step {self.step}, stopping")
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()
        trainer.should_stop = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task included); False outside SLURM or when it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        rank_zero_warn(f"could not requeue SLURM job {job}: {e}")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True
