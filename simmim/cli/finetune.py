"""``python -m simmim.finetune``: fine-tuning, linear probing and kNN evaluation of a (SimMIM-pretrained) encoder.

recipe -> ClassificationDataModule -> FinetuneModule | LinearProbeModule (``mode``), or weighted kNN on the frozen
encoder's features (``mode=knn``, no training). The run folder holds ``recipe.yaml``, ``load_report.txt``, logs,
``checkpoints/best.ckpt`` (by val top-1) and ``last.ckpt``, ``metrics.json`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from simmim import runtime
from simmim.cli.checks import model_geometry
from simmim.cli.command import command_line, log_to_loggers, plan_lines, save_recipe, stopped_text, trainer_arguments
from simmim.cli.runs import RunRuntime, removed_on_refusal, resolve_run_dir, run_runtime, start_run
from simmim.errors import RecipeError
from simmim.training.classify import FinetuneModule, LinearProbeModule
from simmim.training.preemption import Preemption
from simmim.training.pretrain import RUNTIME_ONLY
from simmim.training.trainer import build_trainer, make_loggers, quiet_lightning

__all__ = ["run", "main", "plan"]


def encoder_config(cfg: DictConfig, windows: Sequence[int] | None = None) -> dict[str, Any]:
    """The classifier's encoder config: the recipe's model, with the checkpoint's own windows as
    ``pretrained_window_sizes`` when the recipe leaves them null (the official transfer rule)."""
    config = {**model_geometry(cfg.model), "drop_path_rate": cfg.model.drop_path_rate}
    if config.get("pretrained_window_sizes") is None:
        config.pop("pretrained_window_sizes", None)
        if windows is not None:
            config["pretrained_window_sizes"] = list(windows)
    return config


def build_datamodule(cfg: DictConfig, keep_listing: bool = True) -> Any:
    from simmim.data import ClassificationDataModule

    data = OmegaConf.to_container(cfg.data)
    if cfg.run_dir and keep_listing:  # the folder listing, kept for DDP ranks and resumes (not by --dry-run)
        data["listing_cache"] = str(Path(cfg.run_dir) / "listings")  # text: checkpoints load weights-only
    for key in ("val_root", "test_root"):
        data[key] = None if data[key] in ("auto", None) else data[key]  # auto: root/val, root/test when present
    data["crop_scale"] = tuple(data["crop_scale"])
    try:
        dm = ClassificationDataModule(**data, img_size=cfg.model.img_size, seed=cfg.seed)
    except (ValueError, OSError) as e:  # bad paths, unlabelled folders: one clear line
        raise RecipeError(str(e)) from e
    if dm.num_classes < 2:
        raise RecipeError(
            f"data.root={cfg.data.root} has {dm.num_classes} class ({', '.join(dm.class_names)}): classification "
            "needs at least two; give an ImageFolder tree with one subfolder per class"
        )
    return dm


def _checkpoints(cfg: DictConfig, ckpt_dir: Path) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = int(cfg.checkpoint.every_n_steps)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/top1", mode="max",
                           save_on_train_epoch_end=False)  # fmt: skip
    last = ModelCheckpoint(  # after best (its state is then current): last.ckpt every N steps, else each epoch
        dirpath=ckpt_dir, save_top_k=-1 if cfg.checkpoint.keep_all and every > 0 else 0, save_last=True,
        every_n_train_steps=every if every > 0 else None, filename="step={step:06d}", auto_insert_metric_name=False,
    )  # fmt: skip
    return [best, last]


def _run_knn(cfg: DictConfig, weights: Any, run_dir: Path, rt: RunRuntime) -> dict[str, Any]:
    from simmim.eval import extract_features, knn_accuracy
    from simmim.io import load_pretrained, save_text
    from simmim.models import create_model

    config = encoder_config(cfg, weights.window_sizes)
    model = create_model(config.pop("model"), num_classes=0, **config)
    report = load_pretrained(model, weights)
    save_text(str(report) + "\n", run_dir / "load_report.txt")
    pl.utilities.rank_zero_info(str(report))
    dm = build_datamodule(cfg)
    dm.batch_size = cfg.knn.batch_size
    dm.setup("validate")
    rt.log()
    bank, bank_labels = extract_features(model, dm.train_eval_dataloader(), bf16=rt.precision.bf16)
    queries, labels = extract_features(model, dm.val_dataloader(), bf16=rt.precision.bf16)
    k = min(cfg.knn.k, len(bank))
    if k < cfg.knn.k:
        msg = "warning: knn.k=%d is more than the %d images of the memory bank: k=%d"
        runtime.log.warning(msg, cfg.knn.k, len(bank), k)
    result = knn_accuracy(bank, bank_labels, queries, labels, k, cfg.knn.temperature, dm.num_classes)
    return {
        "mode": "knn", "recipe": cfg.recipe, "pretrained": cfg.pretrained, "k": k, "k_requested": cfg.knn.k,
        "temperature": cfg.knn.temperature, "bank_images": len(bank), "query_images": len(queries),
        "class_names": list(dm.class_names), "val": result, "load_report": report.as_dict(),
    }  # fmt: skip


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run a composed recipe; returns the final metrics (also written to ``<run dir>/metrics.json``)."""
    with run_runtime(cfg, encoder_config(cfg)) as rt, quiet_lightning():
        return _run(cfg, rt)


def _run(cfg: DictConfig, rt: RunRuntime) -> dict[str, Any]:
    from simmim.io import load_pretrained, read_pretrained, save_json, save_text
    from simmim.models import compile_model

    if cfg.mode == "knn" and not cfg.pretrained:
        raise RecipeError("mode=knn evaluates pretrained weights: give pretrained=PATH")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    try:
        weights = read_pretrained(cfg.pretrained, cfg.trust_checkpoint) if cfg.pretrained else None
    except ValueError as e:
        raise RecipeError(f"pretrained={cfg.pretrained}: {e}") from e
    run_dir = resolve_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    with removed_on_refusal(run_dir):  # a refused new run leaves no folder behind
        resume = start_run(cfg, run_dir)
        if cfg.mode == "knn":
            save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
            metrics = {**_run_knn(cfg, weights, run_dir, rt), "run_dir": str(run_dir)}
            metrics["seconds"] = time.perf_counter() - start
            save_json(metrics, run_dir / "metrics.json")
            return metrics
        if cfg.mode == "linear_probe" and weights is None:
            pl.utilities.rank_zero_warn("linear probing random weights (no pretrained=PATH given)")
        dm = build_datamodule(cfg)
        cls = LinearProbeModule if cfg.mode == "linear_probe" else FinetuneModule
        module = cls(
            encoder_config(cfg, weights.window_sizes if weights is not None else None),
            dm.num_classes,
            optim=OmegaConf.to_container(cfg.optim),
            schedule=OmegaConf.to_container(cfg.schedule),
            mixup=OmegaConf.to_container(cfg.mixup),
            batch_size=cfg.data.batch_size,
            class_names=dm.class_names,
            seed=cfg.seed,
            memory={k: cfg.model[k] for k in RUNTIME_ONLY},
        )
        if cfg.compile:
            compile_model(module.model, cfg.compile_mode)
        load = load_pretrained(module.model, weights) if weights is not None else None
        targs = trainer_arguments(cfg, rt, dm)
        preemption = Preemption(ckpt_dir / "last.ckpt")
        callbacks: list[pl.Callback] = [preemption]
        if cfg.memory == "auto":
            from simmim.training.memory import MemoryPlanner

            callbacks.append(MemoryPlanner())
        trainer = build_trainer(
            run_dir, targs, loggers=make_loggers(cfg.logger, run_dir, str(cfg.recipe)), callbacks=callbacks,
            checkpoints=_checkpoints(cfg, ckpt_dir), nan_policy=cfg.nan_policy, images_per_step=module.total_batch,
        )  # fmt: skip
        log_to_loggers(trainer, cfg)
        if trainer.is_global_zero:  # DDP workers re-run this command: one process writes the run folder's files
            save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
            if load is not None:
                save_text(str(load) + "\n", run_dir / "load_report.txt")
                pl.utilities.rank_zero_info(str(load))
    rt.log()
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    if preemption.signal:  # saved; resume=auto continues
        return {"mode": cfg.mode, "run_dir": str(run_dir), "steps": trainer.global_step, "preempted": preemption.signal,
                "checkpoint": str(preemption.checkpoint), "is_global_zero": trainer.is_global_zero}  # fmt: skip
    if module.resumed_step != trainer.global_step and trainer.checkpoint_callback is not None:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)  # stopped mid-epoch: resumable here
    best_cb = trainer.checkpoint_callback
    best = getattr(best_cb, "best_model_path", None) or None
    test_split = "val" if dm.test_source is dm.val_source else "test"  # no separate test split: the val set
    (result,) = trainer.test(module, dataloaders=dm.test_dataloader(), ckpt_path=best, weights_only=True, verbose=False)
    score = getattr(best_cb, "best_model_score", None)
    metrics = {
        "mode": cfg.mode,
        "recipe": cfg.recipe,
        "run_dir": str(run_dir),
        "pretrained": cfg.pretrained,
        "best_checkpoint": best,
        "best_val_top1": float(score) if score is not None else None,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_split": test_split,
        "test": {k.split("/", 1)[1]: v for k, v in result.items() if "acc_class" not in k},
        **module.test_results,
        "load_report": load.as_dict() if load is not None else None,
        "seconds": time.perf_counter() - start,
        "is_global_zero": trainer.is_global_zero,
    }
    if trainer.is_global_zero:
        from simmim.visualize import save_confusion_matrix

        save_json({k: v for k, v in metrics.items() if k != "is_global_zero"}, run_dir / "metrics.json")
        figure = save_confusion_matrix(
            metrics["confusion_matrix"], module.class_names, run_dir / "confusion_matrix.png"
        )
        log_to_loggers(trainer, image=("confusion_matrix", figure))
    return metrics


def plan(cfg: DictConfig) -> str:
    """``--dry-run``: the data, steps, schedule, precision and devices of the run, training nothing."""
    with run_runtime(cfg, encoder_config(cfg)) as rt:
        dm = build_datamodule(cfg, keep_listing=False) if cfg.mode != "knn" else None
        what = f" in {dm.num_classes} classes" if dm is not None else ""
        lines = plan_lines(cfg, rt, dm, what)
    return "\n".join([f"mode: {cfg.mode}; pretrained: {cfg.pretrained}", *lines])


def report(metrics: dict[str, Any]) -> str:
    if metrics.get("preempted"):
        return stopped_text(metrics)
    hidden = ("confusion_matrix", "load_report", "is_global_zero", "per_class_top1", "class_names")
    return json.dumps({k: v for k, v in metrics.items() if k not in hidden}, indent=2, default=str)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmim.finetune [--help] [--dry-run] [--multirun] [recipe=NAME] [key=value ...]``."""
    return command_line("finetune", argv)
