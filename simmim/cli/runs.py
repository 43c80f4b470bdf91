"""Run folders, resumes, the run's hardware decisions and how a command line ends (exit codes, one-line errors).

A run folder is ``run_dir``, else ``output_dir/<recipe>/<name or timestamp>``. Processes that Lightning re-launches
for DDP re-run the command line: the first process appends ``run_dir=<its folder>`` to ``sys.argv`` before the
Trainer exists, so every rank reads the same folder from its own command line.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simmim import runtime
from simmim.errors import RecipeError

__all__ = [
    "RunRuntime",
    "run_runtime",
    "resolve_run_dir",
    "start_run",
    "removed_on_refusal",
    "latest_checkpoint",
    "multi_process_launch",
    "cli_main",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_NONFINITE",
]

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE = 0, 2, 3


def multi_process_launch() -> bool:
    """Whether an external launcher (torchrun, SLURM) started several processes for this run."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment().world_size() > 1
    if SLURMEnvironment.detect():
        return SLURMEnvironment().world_size() > 1
    return False


def resolve_run_dir(cfg: DictConfig, command_line: bool = False) -> Path:
    """``run_dir``, else ``output_dir/<recipe>/<name or timestamp>``, written into ``cfg.run_dir``. For a
    ``command_line`` run it is also appended to ``sys.argv``: the DDP processes that Lightning starts re-run it."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if multi_process_launch() and not cfg.name:
        raise RecipeError("under a multi-process launcher give run_dir=PATH or name=NAME so every rank agrees")
    name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / str(cfg.recipe) / str(name)
    cfg.run_dir = str(run_dir)
    if command_line:
        sys.argv.append(f"run_dir={run_dir}")
    return run_dir


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (None when there is none)."""
    folder = Path(folder)
    ckpts = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def _resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        if not cfg.run_dir and not cfg.name:
            raise RecipeError("resume=auto looks in the run folder: give run_dir=PATH (or name=NAME) as well")
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            runtime.log.info("resume=auto: no checkpoint in %s, starting from scratch", ckpt_dir)
        return found
    path = Path(cfg.resume)
    if not path.is_file():
        raise RecipeError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto or a .ckpt path)")
    return path


def start_run(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Before a run writes to ``run_dir``: the checkpoint ``cfg.resume`` names (None: a new run). A new run is refused
    where ``checkpoints/`` holds an earlier run's (it would overwrite them); temporaries of writes killed mid-way are
    removed."""
    from simmim.io import CheckpointError, check_resume, remove_stale_temporaries

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


@contextlib.contextmanager
def removed_on_refusal(run_dir: Path) -> Iterator[None]:
    """Around what a run does before training: a refusal (a bad value, too few images, an unusable checkpoint)
    removes the run folder again if the run created it, so nothing of a run that never started is left behind."""
    from simmim.data import DataError
    from simmim.io import CheckpointError

    existed = run_dir.exists()
    try:
        yield
    except (RecipeError, DataError, CheckpointError):
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


# ---- hardware ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRuntime:
    """A run's hardware decisions (:mod:`simmim.runtime`): its Lightning precision and torch's CPU threads."""

    precision: runtime.PrecisionChoice
    threads: runtime.ThreadPlan

    def log(self) -> None:
        """One line per decision (logged once the run is set up, so that refusals come first)."""
        log = runtime.log
        log.info("machine: %s", runtime.describe(self.threads.threads))
        log.info("precision: %s -> %s (%s)", self.precision.requested, self.precision.value, self.precision.reason)
        log.info("threads: %d (%s)", self.threads.threads, self.threads.reason)
        for key, reason in runtime.fast_paths().reasons.items():
            log.info("%s: %s", key, reason)
        if self.precision.warning:
            warnings.warn(self.precision.warning, stacklevel=2)

    def resolved(self) -> dict[str, Any]:
        """For ``recipe.yaml``: the request stays in the recipe, what it became on this machine goes beside it."""
        return runtime.summary(precision=self.precision.value, threads=self.threads.threads)


@contextlib.contextmanager
def run_runtime(cfg: DictConfig, model_config: Mapping[str, Any]) -> Iterator[RunRuntime]:
    """Resolve ``trainer.precision`` and ``threads`` on this machine and run the block with torch's CPU threads set
    (restored afterwards, so an in-process run leaves the caller's setting)."""
    from simmim.training.memory import train_gflop_per_image

    trainer = cfg.trainer
    try:
        precision = runtime.resolve_precision(trainer.get("precision", "auto"), trainer.get("accelerator", "auto"))
        work = train_gflop_per_image(model_config, int(cfg.model.img_size))
        threads = runtime.plan_threads(cfg.threads, int(cfg.data.num_workers), work)
    except ValueError as e:
        raise RecipeError(str(e).replace("precision=", "trainer.precision=", 1)) from e
    with runtime.torch_threads(threads.threads):
        runtime.fast_paths()  # measured (or read from the cache) at these threads, before training
        yield RunRuntime(precision, threads)


# ---- how a command ends -------------------------------------------------------------------------------------------
def cli_main(body: Callable[[], int]) -> int:
    """Run a command line's ``body``: refusals and data problems as one ``error:`` line (exit 2), a non-finite loss
    as one line (exit 3), never a traceback for a user's mistake."""
    from simmim.data.errors import DataError

    try:
        return body()
    except DataError as e:  # found while training (possibly in a loader worker): its one-line summary
        print(f"error: {e.summary}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        # the checkpoint and training errors, by name of modules already loaded: a recipe refused before they were
        # imported cannot have raised them, and importing them costs a refusal seconds
        if isinstance(e, (RecipeError, *_loaded("simmim.io.read", "CheckpointError"))):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, _loaded("simmim.training.callbacks", "NonFiniteError")):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        raise


def _loaded(module: str, name: str) -> tuple[type, ...]:
    found = getattr(sys.modules.get(module), name, None)
    return (found,) if isinstance(found, type) else ()
