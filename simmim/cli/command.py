"""What both command lines do around a run: flags, sweeps, the saved recipe, the plan's schedule line, the end.

    python -m simmim.<kind> [--help] [--dry-run] [--cfg job] [--multirun] [--quiet] [recipe=NAME] [key=value ...]

``--help`` lists every recipe key with its default and comment; ``--dry-run`` prints the composed recipe and what
the run would do; ``--cfg job`` prints the composed recipe; ``--multirun`` runs every combination of sweeps such as
``optim.lr=1e-3,2e-3`` one after the other (each in its own run folder); ``--quiet`` shows warnings and errors only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simmim import runtime
from simmim.cli.recipes import available_recipes, base_text, expand_sweeps, load_recipe
from simmim.cli.runs import EXIT_OK, cli_main, resolve_run_dir

__all__ = ["command_line", "save_recipe", "schedule_text", "world_size"]

FLAGS = ("--help", "-h", "--dry-run", "--cfg", "--multirun", "-m", "--quiet", "-q")


def save_recipe(cfg: DictConfig, path: str | Path, resolved: Mapping[str, Any] | None = None) -> Path:
    """The composed recipe as YAML (atomically); ``resolved``: what its ``auto`` values became on this machine, under
    ``resolved:`` (left out when the file is read back as a recipe, so a resume elsewhere resolves again)."""
    from simmim.io import save_text

    data = OmegaConf.to_container(cfg, resolve=True)
    if resolved:
        data["resolved"] = dict(resolved)
    return save_text(OmegaConf.to_yaml(OmegaConf.create(data)), path)


def world_size(cfg: DictConfig) -> int:
    """Processes of the run from the recipe (``trainer.devices`` x ``trainer.num_nodes``; ``auto``: the GPUs)."""
    import torch

    devices = cfg.trainer.get("devices", "auto")
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if runtime.device_type(cfg.trainer.get("accelerator")) == "cuda" else 1
    n = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else int(devices)
    return max(1, n) * int(cfg.trainer.get("num_nodes", 1))


def schedule_text(cfg: DictConfig, steps_per_epoch: int) -> str:
    """One line: the run's length and its lr schedule in optimizer steps."""
    s = cfg.schedule
    per_epoch = s.steps / s.epochs if s.steps else steps_per_epoch
    total = round(s.epochs * per_epoch)
    text = (
        f"schedule: {total} optimizer steps ({'schedule.steps' if s.steps else f'{s.epochs:g} epochs'}), {s.name}, "
        f"warmup {round(s.warmup_epochs * per_epoch)} steps"
    )
    if s.name == "multistep" and len(s.milestones):
        text += f", x{s.gamma:g} at steps {[round(m * per_epoch) for m in s.milestones]}"
    max_steps = cfg.trainer.get("max_steps")
    if max_steps and max_steps > 0:
        text += f"; stops early at trainer.max_steps={max_steps}"
    return text


def steps_per_epoch(cfg: DictConfig, train_images: int) -> int:
    """Optimizer steps of one epoch, as the modules count them (whole batches on every process, whole
    accumulations): the preview for refusals and ``--dry-run``."""
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    return train_images // (cfg.data.batch_size * world_size(cfg)) // accumulate


def trainer_arguments(cfg: DictConfig, rt: Any, datamodule: Any) -> dict[str, Any]:
    """The recipe's ``trainer.*`` with the resolved precision and the run length (``schedule.*``). Refused first,
    before the run folder is written: too few images for one batch per process (the training sampler's rule and
    message) and ``trainer.max_steps`` past the schedule's end (the module's rule, checked again when it runs)."""
    from simmim.data import EpochSampler
    from simmim.training.optim import check_max_steps, run_length

    images = len(datamodule.train_indices)
    EpochSampler(images, cfg.data.batch_size, rank=0, world_size=world_size(cfg), size_notes=datamodule.size_notes)
    s, max_steps = cfg.schedule, cfg.trainer.get("max_steps")
    if max_steps:
        per_epoch = s.steps / s.epochs if s.steps else steps_per_epoch(cfg, images)
        check_max_steps(int(max_steps), round(s.epochs * per_epoch), s.epochs, s.steps)
    targs = OmegaConf.to_container(cfg.trainer)
    targs["precision"] = rt.precision.value
    targs["max_epochs"], targs["max_steps"] = run_length(s.epochs, s.steps, targs.get("max_steps"))
    return targs


def plan_lines(cfg: DictConfig, rt: Any, datamodule: Any | None, what: str = "") -> list[str]:
    """``--dry-run``'s lines: the data and steps (``what`` says more about the images), the schedule, precision and
    threads on this machine."""
    lines = []
    if datamodule is not None:
        images, world = len(datamodule.train_indices), world_size(cfg)
        per_epoch = steps_per_epoch(cfg, images)
        lines += [
            f"data: {images} training images{what}; {per_epoch} optimizer steps per epoch ({cfg.data.batch_size} per "
            f"device x {world} processes x {cfg.trainer.get('accumulate_grad_batches', 1)} accumulation)",
            schedule_text(cfg, per_epoch),
        ]
    p, t = rt.precision, rt.threads
    lines.append(f"precision: {p.requested} -> {p.value} ({p.reason}); threads {t.threads} ({t.reason}); "
                 f"{runtime.describe(t.threads)}")  # fmt: skip
    return lines


def stopped_text(out: Mapping[str, Any]) -> str | None:
    """What a run stopped by a signal says (None when it was not)."""
    if not out.get("preempted"):
        return None
    return (
        f"stopped by {out['preempted']} at step {out['steps']}: saved {out['checkpoint']}; continue with the same "
        f"command and resume=auto run_dir={out['run_dir']}"
    )


def log_to_loggers(trainer: Any, cfg: DictConfig | None = None, image: tuple[str, Path] | None = None) -> None:
    """The resolved recipe as every logger's hyper-parameters (``cfg``), or a picture of the run (``image``: a tag
    and a PNG) as an image or artifact: TensorBoard images, MLflow artifacts, W&B images; CSV takes neither."""
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if cfg is not None and not isinstance(logger, CSVLogger):
            logger.log_hyperparams({"recipe": OmegaConf.to_container(cfg, resolve=True)})
        if image is None or not trainer.is_global_zero:
            continue
        tag, path = image
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            logger.experiment.add_image(tag, np.asarray(Image.open(path).convert("RGB")), trainer.global_step,
                                        dataformats="HWC")  # fmt: skip
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)


def _multirun_dirs(cfg: DictConfig, index: int, stamp: str) -> None:
    if cfg.run_dir:
        cfg.run_dir = str(Path(cfg.run_dir) / str(index))
    else:
        cfg.name = f"{cfg.name or stamp}/{index}"


def command_line(kind: str, argv: Sequence[str] | None) -> int:
    """A ``python -m simmim.<kind>`` command line (module docstring); the exit code.

    ``simmim.cli.<kind>`` (its ``run``, ``report``, ``plan`` and docstring) is imported only once the recipe is
    composed and checked: a refused value costs Hydra and the checks, not Lightning's imports (seconds)."""
    import importlib
    from datetime import datetime

    from simmim.data.errors import show_bad_images_plainly

    def command():
        return importlib.import_module(f"simmim.cli.{kind}")

    from_sys = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in args if a in FLAGS}
    if flags & {"--cfg"}:
        index = args.index("--cfg")
        if index + 1 >= len(args) or args[index + 1] != "job":
            print("error: --cfg takes job (the composed recipe), e.g. --cfg job", file=sys.stderr)
            return 2
        args.pop(index + 1)
    unknown = [a for a in args if a.startswith("-") and a not in FLAGS]
    if unknown:
        print(f"error: unknown flag {unknown[0]}: use {', '.join(f for f in FLAGS if f.startswith('--'))}",
              file=sys.stderr)  # fmt: skip
        return 2
    args = [a for a in args if a not in FLAGS]
    if flags & {"--help", "-h"}:
        print((command().__doc__ or "").strip() + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].strip())
        print(f"\nRecipes (recipe=NAME): {', '.join(available_recipes(kind))}\n")
        print(f"Every key, its default and what it does (recipes/{kind}/_base.yaml):\n")
        print(base_text(kind))
        return EXIT_OK
    _log_to_stderr(logging.WARNING if flags & {"--quiet", "-q"} else logging.INFO)
    show_bad_images_plainly()
    multirun = bool(flags & {"--multirun", "-m"})

    def body() -> int:
        sweeps = expand_sweeps(args) if multirun else [args]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        configs = [load_recipe(kind, one) for one in sweeps]  # every combination checked before any runs
        for index, cfg in enumerate(configs):
            if multirun:
                _multirun_dirs(cfg, index, stamp)
            if flags & {"--cfg"}:
                print(OmegaConf.to_yaml(cfg, resolve=True), end="")
                continue
            if flags & {"--dry-run"}:
                print(OmegaConf.to_yaml(cfg, resolve=True) + command().plan(cfg))
                continue
            resolve_run_dir(cfg, command_line=from_sys and not multirun)
            if multirun:
                print(f"run {index + 1}/{len(configs)}: {' '.join(sweeps[index])}", file=sys.stderr)
            out = command().run(cfg)
            if out.get("is_global_zero", True):
                print(command().report(out))
        return EXIT_OK

    return cli_main(body)


def _log_to_stderr(level: int = logging.INFO) -> None:
    """Show simmim's log (the hardware decisions among it) on stderr; below warnings, from the first process only."""
    logger = logging.getLogger("simmim")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_first_process_or_warning)
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is logged (not the one it was made with, which a caller
    such as a test runner's capture may have closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _first_process_or_warning(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
        return True
    # Lightning's rank, asked when a line is logged: importing it costs seconds a refused command line need not pay
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
