"""SimMIM pretraining: the LightningModule and ``python -m simmim.pretrain recipe=NAME key=value ...``.

recipe -> PretrainDataModule (images, masks) -> SimMIMPretrainModule -> SimMIM(model) -> loss. A run folder
holds the resolved ``recipe.yaml``, TensorBoard + CSV logs, checkpoints (``checkpoints/step=*.ckpt`` and
``last.ckpt``, written atomically), and at the end ``encoder.safetensors`` and ``reconstructions.png``.

Lightning checkpoints keep the SimMIM model under ``model.``: encoder weights are ``model.encoder.<official
key>``, the head ``model.decoder.*``; ``hyper_parameters["model_config"]`` (also the metadata of
``encoder.safetensors``) rebuilds the encoder: ``create_model(cfg.pop("model"), **cfg)``.

Usage: ``python -m simmim.pretrain [recipe=NAME] [key=value ...]``, e.g. ``recipe=imagenette_cpu
data.batch_size=32 trainer.max_steps=100``; ``resume=auto run_dir=PATH`` continues a run exactly.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn

from simmim import runtime
from simmim.callbacks import (
    AtomicCheckpointIO,
    ExactResume,
    NonFiniteError,
    NonFiniteGuard,
    fit_context,
    resolve_run_dir,
    start_run,
)
from simmim.checkpoint import CheckpointError, save_encoder
from simmim.config import RecipeError, RunRuntime, available_recipes, load_recipe, run_runtime, save_recipe
from simmim.data import DataError, show_bad_images_plainly
from simmim.distributed import (
    full_state_dict,
    make_trainer,
    shard_optimizer,
    shard_train_sampler,
    sharding_strategy,
)
from simmim.memory import MemoryPlanner
from simmim.models.registry import MODEL_CONFIGS, compile_model, encoder_config
from simmim.models.simmim import SimMIM, build_simmim
from simmim.optim import (
    LRSchedule,
    build_optimizer,
    build_scheduler,
    check_max_steps,
    clip_gradients,
    fused_adamw_ok,
    run_length,
    scale_lr,
)

__all__ = ["SimMIMPretrainModule", "model_config", "check_geometry", "run", "main"]


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """:func:`simmim.models.registry.encoder_config`, with a recipe error for an unknown ``model.name``."""
    if name not in MODEL_CONFIGS:
        raise RecipeError(f"model.name={name!r} is not a known model; available: {', '.join(sorted(MODEL_CONFIGS))}")
    return encoder_config(name, **overrides)


class SimMIMPretrainModule(ExactResume, pl.LightningModule):
    """SimMIM pretraining of a SwinV2 encoder.

    Args:
        model: a name in ``MODEL_CONFIGS`` (``swinv2_base``, ``swinv2_nano``, ...).
        model_kwargs: encoder constructor overrides (``img_size``, ``window_size``, ``drop_path_rate``, ...).
        norm_target / norm_target_patch_size: the official NORM_TARGET (locally normalised pixel targets).
        optim: ``lr``, ``warmup_lr``, ``min_lr`` (per 512 images), ``weight_decay``, ``layer_decay``, ``betas``,
            ``eps``, ``official_wd_exemption_bug`` (see :mod:`simmim.optim`).
        schedule: ``name`` (cosine | multistep | constant), ``epochs``, ``warmup_epochs``, ``milestones``
            (epochs), ``gamma``. Steps come from the train loader length and ``accumulate_grad_batches``.
        batch_size: images per device per step, for the lr scaling; None reads the datamodule's ``batch_size``.
        init_from: optional weights (any layout :func:`simmim.checkpoint.load_pretrained` reads) to start from.
    """

    def __init__(
        self,
        model: str = "swinv2_nano",
        model_kwargs: Mapping[str, Any] | None = None,
        norm_target: bool = False,
        norm_target_patch_size: int = 47,
        optim: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        self.save_hyperparameters(
            {
                "model_config": model_config(model, **kwargs),
                "model_kwargs": kwargs,
                "norm_target": norm_target,
                "norm_target_patch_size": norm_target_patch_size,
                "optim": dict(optim or {}),
                "schedule": dict(schedule or {}),
                "batch_size": batch_size,
                "init_from": init_from,
            }
        )
        self.model: SimMIM = build_simmim(
            model, norm_target=norm_target, norm_target_patch_size=norm_target_patch_size, **kwargs
        )
        if init_from:
            from simmim.checkpoint import load_pretrained

            print(load_pretrained(self.model.encoder, init_from))
        self._param_ndims = {n: p.ndim for n, p in self.model.named_parameters()}  # before FSDP flattens them
        self.optim_cfg = {
            "lr": 1e-4,
            "warmup_lr": 5e-7,
            "min_lr": 5e-6,
            "weight_decay": 0.05,
            "layer_decay": 1.0,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "official_wd_exemption_bug": True,
            **(optim or {}),
        }
        self.schedule_cfg = {
            "name": "multistep",
            "epochs": 800,
            "warmup_epochs": 10,
            "milestones": [700],
            "gamma": 0.1,
            **(schedule or {}),
        }

    # ---- steps --------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(image, mask)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"], batch["mask"])
        lr = max(g["lr"] for g in self.optimizers().param_groups)
        # mean over processes (every image has the same number of masked pixels): the loss of the global batch
        n = len(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"], batch["mask"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    # ---- optimiser and schedule -------------------------------------------------------------------------
    def total_batch(self) -> int:
        """Images per optimizer step over all devices: batch * world size * accumulation (the lr scaling)."""
        batch = self.hparams.batch_size or getattr(self.trainer.datamodule, "batch_size", None)
        if not batch:
            raise ValueError("SimMIMPretrainModule needs batch_size (or a datamodule with .batch_size) to scale lr")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def loader_batch(self) -> int:
        return self.total_batch() // self.trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        self.trainer.fit_loop.setup_data()  # sizes the train loader (num_training_batches), also under max_steps
        batches, accumulate = self.trainer.num_training_batches, self.trainer.accumulate_grad_batches
        if batches < accumulate:
            raise RecipeError(
                f"trainer.accumulate_grad_batches={accumulate} is more than the {batches} batches of an epoch: "
                "lower it (or data.batch_size), or add images"
            )
        return batches // accumulate  # whole accumulations only: on_train_batch_start drops the rest

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        # Every optimizer step averages batch x world size x accumulate images: the epoch's last batches that cannot
        # fill a whole accumulation are dropped (-1 ends the epoch) instead of stepping on a partial one.
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1 and batch_idx >= self.trainer.num_training_batches // accumulate * accumulate:
            return -1
        return None

    def setup(self, stage: str) -> None:
        if stage == "fit":  # runs after the datamodule's setup, with the process group up
            shard_train_sampler(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        o, s = self.optim_cfg, self.schedule_cfg
        total = self.total_batch()
        optimizer = build_optimizer(
            self.model,
            lr=scale_lr(o["lr"], total),
            weight_decay=o["weight_decay"],
            layer_decay=o["layer_decay"],
            betas=o["betas"],
            eps=o["eps"],
            official_wd_exemption_bug=o["official_wd_exemption_bug"],
            ndims=self._param_ndims,
            fused=fused_adamw_ok(self.trainer),
        )
        if o.get("zero"):
            optimizer = shard_optimizer(optimizer, self.trainer)
        per_epoch: float = self.steps_per_epoch()
        if s.get("steps"):  # the run's length in steps: the schedule laid over it in its proportions
            per_epoch = s["steps"] / s["epochs"]
        check_max_steps(self.trainer.max_steps, round(s["epochs"] * per_epoch), s["epochs"], s.get("steps"))
        schedule = LRSchedule(
            total_steps=round(s["epochs"] * per_epoch),
            warmup_steps=round(s["warmup_epochs"] * per_epoch),
            warmup_lr=scale_lr(o["warmup_lr"], total),
            min_lr=scale_lr(o["min_lr"], total),
            name=s["name"],
            milestones=tuple(round(m * per_epoch) for m in s["milestones"]),
            gamma=s["gamma"],
        )
        scheduler = build_scheduler(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def schedule_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return {f"schedule.{k}": v for k, v in (hparams.get("schedule") or {}).items()}


# ---- recipe -> objects ---------------------------------------------------------------------------------------
def check_geometry(cfg: DictConfig) -> None:
    """Errors for impossible image / mask / window geometry, before any model or data is built."""
    m, d = cfg.model, cfg.data
    full = model_config(m.name, **_geometry(m))
    img, patch, window = int(m.img_size), int(full.get("patch_size", 4)), full.get("window_size", 7)
    mp, ratio = int(d.mask_patch_size), float(d.mask_ratio)
    if img % mp:
        raise RecipeError(
            f"model.img_size={img} is not divisible by data.mask_patch_size={mp}: use an image size that is a "
            f"multiple of {mp} (e.g. {max(mp, img // mp * mp)}) or another mask_patch_size"
        )
    if mp % patch:
        raise RecipeError(
            f"data.mask_patch_size={mp} is not divisible by the model's patch size {patch}: use a multiple of {patch}"
        )
    if not 0.0 < ratio < 1.0:
        raise RecipeError(f"data.mask_ratio={ratio} must lie strictly between 0 and 1 (the paper uses 0.6)")
    grid = img // patch
    if window > grid:
        raise RecipeError(
            f"model.window_size={window} is larger than the first stage's {grid}x{grid} token grid "
            f"(img_size {img} / patch {patch}): every stage would attend globally; use window_size <= {grid}"
        )
    if m.norm_target and (int(m.norm_target_patch_size) % 2 != 1 or int(m.norm_target_patch_size) < 3):
        raise RecipeError(
            f"model.norm_target_patch_size={m.norm_target_patch_size} must be odd and at least 3 (a neighbourhood "
            "with a variance; official: 47)"
        )
    if cfg.memory not in ("manual", "auto"):
        raise RecipeError(f"memory={cfg.memory!r}: use manual (model.use_checkpoint, model.attn_chunk_size) or auto")
    if cfg.nan_policy not in ("auto", "stop", "skip"):
        raise RecipeError(f"nan_policy={cfg.nan_policy!r}: use auto, stop or skip")
    if cfg.schedule.name not in ("cosine", "multistep", "constant"):
        raise RecipeError(f"schedule.name={cfg.schedule.name!r}: use cosine, multistep or constant")


def build_module(cfg: DictConfig) -> SimMIMPretrainModule:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    name = m.pop("name")
    norm_target, nt_patch = m.pop("norm_target"), m.pop("norm_target_patch_size")
    init_from = m.pop("init_from", None)
    try:
        return SimMIMPretrainModule(
            model=name,
            model_kwargs=m,
            norm_target=norm_target,
            norm_target_patch_size=nt_patch,
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            schedule=OmegaConf.to_container(cfg.schedule, resolve=True),
            batch_size=cfg.data.batch_size,
            init_from=init_from,
        )
    except CheckpointError as e:
        raise RecipeError(f"model.init_from={init_from}: {e}") from e


def build_datamodule(cfg: DictConfig, patch_size: int) -> pl.LightningDataModule:
    from simmim.data import PretrainDataModule

    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("crop_scale", "crop_ratio"):
        data[key] = tuple(data[key])
    return PretrainDataModule(img_size=cfg.model.img_size, model_patch_size=patch_size, seed=cfg.seed, **data)


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: Sequence[pl.Callback] = (), precision: str | None = None
) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    targs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if precision is None:
        precision = runtime.resolve_precision(targs.get("precision", "auto"), targs.get("accelerator")).value
    targs["precision"] = precision
    if "max_epochs" in targs:
        raise RecipeError("set schedule.epochs instead of trainer.max_epochs (the lr schedule is built from it)")
    every = int(cfg.checkpoint.every_n_steps)
    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step={step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every if every > 0 else None,
        every_n_epochs=None if every > 0 else 0,  # 0: no periodic saves, only last.ckpt at the end
        save_top_k=-1 if cfg.checkpoint.keep_all else 1,  # 1: only the newest step checkpoint stays
        save_last=True,
    )
    logs = run_dir / "logs"
    version = f"version_{sum(1 for p in logs.glob('version_*'))}"  # one folder per launch (resumes add one)
    loggers = [
        TensorBoardLogger(run_dir, name="logs", version=version, default_hp_metric=False),
        CSVLogger(logs, name=version, version="csv"),  # logs/version_N/csv/metrics.csv
    ]
    targs["max_epochs"], targs["max_steps"] = run_length(
        cfg.schedule.epochs, cfg.schedule.get("steps"), targs.get("max_steps")
    )
    return make_trainer(
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=[ckpt, NonFiniteGuard(cfg.nan_policy), *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module's sampler shards and seeds itself
        **targs,
    )


# ---- outputs --------------------------------------------------------------------------------------------------
def export_encoder(model: SimMIM, config: dict[str, Any], path: str | Path) -> Path:
    """``encoder.safetensors``: official keys without ``encoder.``, mask_token dropped, config in metadata."""
    sd = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    return save_encoder(sd, path, config)


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
    hp = module.hparams
    nt = dict(norm_target=hp.norm_target, norm_target_patch_size=hp.norm_target_patch_size)
    model = build_simmim(hp.model_config["model"], **nt, **hp.model_kwargs)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def _grid_callback(cfg: DictConfig, datamodule: Any, run_dir: Path) -> pl.Callback:
    """Reconstruction grids of fixed images every ``visualize_every_n_steps`` (``run_dir/reconstructions``).
    The images are read before fitting, so the train sampler's resume position is left untouched."""
    from simmim.visualize import ReconstructionGridCallback, input_normalisation, sample_images

    images, _ = sample_images(datamodule, max(1, cfg.reconstructions))
    mean, std = input_normalisation(datamodule)
    return ReconstructionGridCallback(
        images,
        every_n_steps=cfg.visualize_every_n_steps,
        num_images=len(images),
        seed=cfg.seed,
        mask_patch_size=cfg.data.mask_patch_size,
        mask_ratio=cfg.data.mask_ratio,
        mean=mean,
        std=std,
        dirpath=run_dir / "reconstructions",
    )


def _knn_callback(cfg: DictConfig, bf16: bool) -> pl.Callback:
    """kNN accuracy of the encoder's features on a labelled split every ``knn.every_n_epochs`` epochs."""
    from simmim.data import ClassificationDataModule
    from simmim.eval import KNNMonitor

    k, d = cfg.knn, cfg.data
    make = lambda: ClassificationDataModule(  # noqa: E731 - built at the first evaluation, on each process
        root=k.root,
        img_size=cfg.model.img_size,
        batch_size=k.batch_size,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
        label_fraction=k.label_fraction,
        seed=cfg.seed,
    )
    return KNNMonitor.from_datamodule(make, every_n_epochs=k.every_n_epochs, bf16=bf16)


# ---- entry points ----------------------------------------------------------------------------------------------
def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Run a resolved recipe (see :func:`simmim.config.load_recipe`); returns paths and the final loss."""
    check_geometry(cfg)
    with run_runtime(cfg, model_config(cfg.model.name, **_geometry(cfg.model))) as rt:
        return _run(cfg, callbacks, rt)


def _geometry(m: DictConfig) -> dict[str, Any]:
    return {k: m[k] for k in ("img_size", "window_size", "patch_size") if k in m}


def _run(cfg: DictConfig, callbacks: Sequence[pl.Callback], rt: RunRuntime) -> dict[str, Any]:
    run_dir = resolve_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    resume = start_run(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:  # bad paths, empty folders, impossible model sizes: one clear line from the CLI, not a traceback
        module = build_module(cfg)
        if cfg.compile:
            compile_model(module.model, cfg.compile_mode)
        datamodule = build_datamodule(cfg, module.model.patch_size)
    except (ValueError, OSError) as e:
        raise RecipeError(str(e)) from e
    if cfg.memory == "auto":  # checkpointing / attention chunks chosen per process at setup (simmim.memory)
        callbacks = [*callbacks, MemoryPlanner()]
    callbacks = list(callbacks)
    # Sharded strategies hold no process's model whole: the in-training probes (which run the model on its own)
    # are left out; the final encoder and reconstructions are made from the gathered weights (trained_model).
    sharded = str(cfg.trainer.strategy).startswith(("fsdp", "deepspeed"))
    for key, on in (("visualize_every_n_steps", cfg.visualize_every_n_steps > 0), ("knn.root", bool(cfg.knn.root))):
        if on and sharded:
            rank_zero_warn(f"{key} is ignored under trainer.strategy={cfg.trainer.strategy} (sharded weights)")
    if cfg.visualize_every_n_steps > 0 and not sharded:
        callbacks.append(_grid_callback(cfg, datamodule, run_dir))
    if cfg.knn.root and not sharded:
        callbacks.append(_knn_callback(cfg, rt.precision.bf16))
    trainer = build_trainer(cfg, run_dir, callbacks, rt.precision.value)
    if trainer.is_global_zero:
        save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
    rt.log()
    start = time.perf_counter()
    with fit_context(run_dir):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    out: dict[str, Any] = {
        "run_dir": run_dir,
        "seconds": time.perf_counter() - start,
        "steps": trainer.global_step,
        "loss": float(trainer.callback_metrics.get("train/loss_step", float("nan"))),
    }
    if module.resumed_step == trainer.global_step:  # resumed a finished run: nothing trained, nothing to rewrite
        return {**out, "checkpoint": resume, "already_complete": True}
    trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
    out["checkpoint"] = ckpt_dir / "last.ckpt"
    model = trained_model(trainer, module)
    if model is not None:
        out["encoder"] = export_encoder(model, module.hparams.model_config, run_dir / "encoder.safetensors")
        if cfg.reconstructions > 0:
            title = f"{module.hparams.model_config['model']} step {module.global_step}"
            out["reconstructions"] = save_reconstructions(
                model, datamodule, run_dir / "reconstructions.png", cfg.reconstructions, title
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmim.pretrain recipe=NAME key=value ...`` (no arguments: recipe quickstart)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__ + f"\nRecipes (recipes/pretrain): {', '.join(available_recipes('pretrain'))}")
        return 0
    show_bad_images_plainly()
    runtime.log_to_stderr()
    try:
        cfg = load_recipe("pretrain", argv)
        out = run(cfg)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # found while training (possibly in a loader worker): its one-line summary
        print(f"error: {e.summary}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if out.get("already_complete") and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"nothing to do: the run in {out['run_dir']} is complete at step {out['steps']} ({out['checkpoint']})")
    if out.get("encoder"):
        print(
            f"done: {out['steps']} steps in {out['seconds']:.0f} s, final loss {out['loss']:.4f}\n"
            f"  run folder      {out['run_dir']}\n"
            f"  checkpoint      {out['checkpoint']}\n"
            f"  encoder         {out['encoder']}\n"
            + (f"  reconstructions {out['reconstructions']}\n" if "reconstructions" in out else "")
            + f"  logs            tensorboard --logdir {out['run_dir'] / 'logs'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
