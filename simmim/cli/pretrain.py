"""``python -m simmim.pretrain``: recipe -> PretrainDataModule (images, masks) -> SimMIMPretrainModule -> loss.

A run folder holds the resolved ``recipe.yaml``, TensorBoard + CSV logs, checkpoints (``checkpoints/step=*.ckpt``
and ``last.ckpt``, written atomically), and at the end ``encoder.safetensors`` and ``reconstructions.png``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from simmim.cli.checks import model_geometry
from simmim.cli.command import command_line, log_to_loggers, plan_lines, save_recipe, stopped_text, trainer_arguments
from simmim.cli.runs import RunRuntime, removed_on_refusal, resolve_run_dir, run_runtime, start_run
from simmim.errors import RecipeError
from simmim.io import save_text
from simmim.models.simmim import SimMIM
from simmim.training.preemption import Preemption
from simmim.training.pretrain import RUNTIME_ONLY, SimMIMPretrainModule
from simmim.training.strategy import full_state_dict, sharding_strategy
from simmim.training.trainer import build_trainer, make_loggers, quiet_lightning

__all__ = ["run", "main", "build_module", "build_datamodule", "plan"]


def encoder_config(cfg: DictConfig) -> dict[str, Any]:
    """The encoder's full config from the recipe's ``model`` section (runtime-only memory options apart)."""
    return {**model_geometry(cfg.model), "drop_path_rate": cfg.model.drop_path_rate}


def build_module(cfg: DictConfig) -> SimMIMPretrainModule:
    from simmim.io import CheckpointError

    m = cfg.model
    try:
        return SimMIMPretrainModule(
            encoder_config(cfg),
            norm_target=m.norm_target,
            norm_target_patch_size=m.norm_target_patch_size,
            optim=OmegaConf.to_container(cfg.optim),
            schedule=OmegaConf.to_container(cfg.schedule),
            batch_size=cfg.data.batch_size,
            memory={k: m[k] for k in RUNTIME_ONLY},
            init_from=m.init_from,
        )
    except CheckpointError as e:
        raise RecipeError(f"model.init_from={m.init_from}: {e}") from e


def build_datamodule(cfg: DictConfig, patch_size: int, keep_listing: bool = True) -> pl.LightningDataModule:
    from simmim.data import PretrainDataModule

    data = OmegaConf.to_container(cfg.data)
    if cfg.run_dir and keep_listing:  # the folder listing, kept for DDP ranks and resumes (not by --dry-run)
        data["listing_cache"] = str(Path(cfg.run_dir) / "listings")  # text: checkpoints load weights-only
    for key in ("crop_scale", "crop_ratio"):
        data[key] = tuple(data[key])
    try:
        return PretrainDataModule(img_size=cfg.model.img_size, model_patch_size=patch_size, seed=cfg.seed, **data)
    except (ValueError, OSError) as e:  # bad paths, empty folders: one clear line
        raise RecipeError(str(e)) from e


def _checkpoints(cfg: DictConfig, ckpt_dir: Path) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = int(cfg.checkpoint.every_n_steps)
    return [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step={step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every if every > 0 else None,
            every_n_epochs=None if every > 0 else 0,  # 0: no periodic saves, only last.ckpt at the end
            save_top_k=-1 if cfg.checkpoint.keep_all else 1,  # 1: only the newest step checkpoint stays
            save_last=True,
        )
    ]


def _probes(cfg: DictConfig, datamodule: Any, run_dir: Path, rt: RunRuntime) -> list[pl.Callback]:
    """The in-training probes: reconstruction grids of fixed images and the kNN monitor (read before fitting, so the
    train sampler's resume position is left untouched)."""
    out: list[pl.Callback] = []
    if cfg.visualize_every_n_steps > 0:
        from simmim.visualize import ReconstructionGridCallback, input_normalisation, sample_images

        images, _ = sample_images(datamodule, max(1, cfg.reconstructions))
        mean, std = input_normalisation(datamodule)
        out.append(
            ReconstructionGridCallback(
                images,
                every_n_steps=cfg.visualize_every_n_steps,
                num_images=len(images),
                seed=cfg.seed,
                mask_patch_size=cfg.data.mask_patch_size,
                mask_ratio=cfg.data.mask_ratio,
                mean=mean,
                std=std,
                dirpath=run_dir / "reconstructions",
            )  # fmt: skip
        )
    if cfg.knn.root:
        from simmim.data import ClassificationDataModule
        from simmim.training.callbacks import KNNMonitor

        k, d = cfg.knn, cfg.data
        make = lambda: ClassificationDataModule(  # noqa: E731 - built at the first evaluation, on each process
            root=k.root, img_size=cfg.model.img_size, batch_size=k.batch_size, num_workers=d.num_workers,
            pin_memory=d.pin_memory, label_fraction=k.label_fraction, seed=cfg.seed,
        )  # fmt: skip
        out.append(
            KNNMonitor.from_datamodule(
                make, every_n_epochs=k.every_n_epochs, k=k.k, temperature=k.temperature, bf16=rt.precision.bf16
            )
        )
    return out


def export_encoder(model: SimMIM, config: dict[str, Any], path: str | Path, provenance: dict[str, Any]) -> Path:
    """``encoder.safetensors``: official keys without ``encoder.``, mask_token dropped, the config (and where the
    weights come from) in its metadata."""
    from simmim.io import save_encoder

    sd = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    return save_encoder(sd, path, config, provenance)


def save_reconstructions(model: SimMIM, datamodule: Any, path: str | Path, n: int = 8, title: str = "") -> Path:
    """A grid original / masked / prediction / pasted for ``n`` images (:mod:`simmim.visualize`)."""
    from simmim.visualize import input_normalisation, sample_images, save_reconstruction_grid

    images, masks = sample_images(datamodule, n)
    mean, std = input_normalisation(datamodule)
    save_reconstruction_grid(model, images, masks, path, mean=mean, std=std, title=title)
    return Path(path)


def trained_model(trainer: pl.Trainer, module: SimMIMPretrainModule) -> SimMIM | None:
    """The trained SimMIM whole on rank 0 (None elsewhere): the module's own under single-process and DDP runs, a
    plain copy of the gathered weights under FSDP / DeepSpeed. Call on every process (gathering is collective)."""
    if sharding_strategy(trainer.strategy) is None:
        return module.model if trainer.is_global_zero else None
    state = full_state_dict(trainer, module)
    if not trainer.is_global_zero:
        return None
    from simmim.io import read_pretrained, simmim_from_weights

    return simmim_from_weights(read_pretrained({"state_dict": state, "hyper_parameters": dict(module.hparams)}))


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Run a composed recipe (:func:`simmim.cli.recipes.load_recipe`); returns paths and the final loss."""
    with run_runtime(cfg, encoder_config(cfg)) as rt, quiet_lightning():
        return _run(cfg, callbacks, rt)


def _run(cfg: DictConfig, callbacks: Sequence[pl.Callback], rt: RunRuntime) -> dict[str, Any]:
    from simmim.models import compile_model

    run_dir = resolve_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    with removed_on_refusal(run_dir):  # a refused new run leaves no folder behind
        resume = start_run(cfg, run_dir)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_module(cfg)
        if cfg.compile:
            compile_model(module.model, cfg.compile_mode)
        datamodule = build_datamodule(cfg, module.model.patch_size)
        preemption = Preemption(ckpt_dir / "last.ckpt")
        callbacks = [*callbacks, preemption]
        if cfg.memory == "auto":  # checkpointing / attention chunks chosen per process at setup
            from simmim.training.memory import MemoryPlanner

            callbacks.append(MemoryPlanner())
        targs = trainer_arguments(cfg, rt, datamodule)
        trainer = build_trainer(
            run_dir, targs, loggers=make_loggers(cfg.logger, run_dir, str(cfg.recipe)), callbacks=callbacks,
            checkpoints=_checkpoints(cfg, ckpt_dir), nan_policy=cfg.nan_policy, images_per_step=module.total_batch,
        )  # fmt: skip
        # Sharded strategies hold no process's model whole: the in-training probes (which run the model on its own)
        # are left out; the final encoder and reconstructions are made from the gathered weights (trained_model).
        probes = _probes(cfg, datamodule, run_dir, rt)
        if probes and sharding_strategy(trainer.strategy) is not None:
            pl.utilities.rank_zero_warn(
                f"visualize_every_n_steps and knn.root are ignored under trainer.strategy={cfg.trainer.strategy} "
                "(sharded weights)"
            )
            probes = []
        trainer.callbacks.extend(probes)
        log_to_loggers(trainer, cfg)
        if trainer.is_global_zero:
            save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
            if module.load_report is not None:
                save_text(str(module.load_report) + "\n", run_dir / "load_report.txt")
                pl.utilities.rank_zero_info(str(module.load_report))
    rt.log()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    out: dict[str, Any] = {
        "run_dir": run_dir,
        "seconds": time.perf_counter() - start,
        "steps": trainer.global_step,
        "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "is_global_zero": trainer.is_global_zero,
    }
    if module.resumed_step == trainer.global_step:  # resumed a finished run: nothing trained, nothing to rewrite
        return {**out, "checkpoint": resume, "already_complete": True}
    if preemption.signal:  # saved; resume=auto continues
        return {**out, "checkpoint": preemption.checkpoint, "preempted": preemption.signal}
    if datamodule.val_set is not None and "val/loss" not in trainer.callback_metrics:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the run ended before val_check_interval
    if "val/loss" in trainer.callback_metrics:
        out["val_loss"] = float(trainer.callback_metrics["val/loss"])
    if trainer.checkpoint_callback is not None:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
        out["checkpoint"] = ckpt_dir / "last.ckpt"
    model = trained_model(trainer, module)
    if model is not None:
        from simmim.visualize import input_normalisation

        recipe, (mean, std) = OmegaConf.to_container(cfg, resolve=True), input_normalisation(datamodule)
        provenance = {"recipe": recipe, "steps": out["steps"], "final_loss": out["loss"], "mean": mean, "std": std}
        out["encoder"] = export_encoder(model, module.hparams.model_config, run_dir / "encoder.safetensors", provenance)
        if cfg.reconstructions > 0:
            title = f"{module.hparams.model_config['model']} step {module.global_step}"
            out["reconstructions"] = save_reconstructions(
                model, datamodule, run_dir / "reconstructions.png", cfg.reconstructions, title
            )
            log_to_loggers(trainer, image=("reconstructions", out["reconstructions"]))
    return out


def plan(cfg: DictConfig) -> str:
    """``--dry-run``: what the run would do (data, steps, schedule, precision, devices, memory), training nothing."""
    config = encoder_config(cfg)
    with run_runtime(cfg, config) as rt:
        dm = build_datamodule(cfg, int(config["patch_size"]), keep_listing=False)
        n_val = len(dm.val_source) if dm.val_source is not None else len(dm.val_indices)
        lines = plan_lines(cfg, rt, dm, f", {n_val} validation ({dm.source!r})")
    model = (
        f"model: {cfg.model.name} {cfg.model.img_size} px, window {cfg.model.window_size}, {config['embed_dim']} "
        f"channels, depths {config['depths']}; memory={cfg.memory} (use_checkpoint={cfg.model.use_checkpoint}, "
        f"attn_chunk_size={cfg.model.attn_chunk_size})"
    )
    return "\n".join([*lines[:-1], model, lines[-1]])


def report(out: dict[str, Any]) -> str:
    if out.get("already_complete"):
        return f"nothing to do: the run in {out['run_dir']} is complete at step {out['steps']} ({out['checkpoint']})"
    if out.get("preempted"):
        return stopped_text(out)
    lines = [f"done: {out['steps']} steps in {out['seconds']:.0f} s, final loss {out['loss']:.4f}"
             + (f", val loss {out['val_loss']:.4f}" if "val_loss" in out else ""),
             f"  run folder      {out['run_dir']}"]  # fmt: skip
    for key, label in (("checkpoint", "checkpoint"), ("encoder", "encoder"), ("reconstructions", "reconstructions")):
        if out.get(key):
            lines.append(f"  {label:<15} {out[key]}")
    lines.append(f"  logs            tensorboard --logdir {out['run_dir'] / 'logs'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmim.pretrain [--help] [--dry-run] [--multirun] [recipe=NAME] [key=value ...]``."""
    return command_line("pretrain", argv)
