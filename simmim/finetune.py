"""Fine-tuning, linear probing and kNN evaluation of a (SimMIM-pretrained) SwinV2 encoder.

``python -m simmim.finetune recipe=NAME pretrained=PATH data.root=PATH key=value ...``; ``resume=auto run_dir=PATH``
continues a stopped run exactly (``checkpoint.every_n_steps`` sets how often ``last.ckpt`` is written).

The fine-tuning recipe is the official one (SwinT main_simmim_ft.py, utils_simmim.py): AdamW with layer-wise lr
decay (applied once), no decay for norms/biases/position-bias MLP, per-step warmup + cosine, gradient clipping
5.0, drop path, mixup / cutmix / label smoothing with a soft-target cross-entropy, RandAugment + random erasing,
eval resize + centre crop. ``mode: linear_probe`` trains only a linear head on the frozen encoder's pooled
features (encoder in eval mode, no BatchNorm); ``mode: knn`` trains nothing and reports weighted kNN accuracy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

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
from simmim.checkpoint import CheckpointError, LoadReport, load_pretrained, read_pretrained
from simmim.config import RecipeError, RunRuntime, load_recipe, run_runtime, save_recipe
from simmim.data import ClassificationDataModule, DataError, show_bad_images_plainly
from simmim.distributed import make_trainer
from simmim.mixup import Mixup, SoftTargetCrossEntropy
from simmim.models.registry import MODEL_CONFIGS, compile_model, create_model
from simmim.models.swinv2 import SwinTransformerV2
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

__all__ = ["FinetuneModule", "run", "main"]

MODES = ("finetune", "linear_probe", "knn")


class FinetuneModule(ExactResume, pl.LightningModule):
    """Image classification with a SwinV2: full fine-tuning or a linear probe on the frozen encoder.

    ``lr``, ``warmup_lr`` and ``min_lr`` are per 512 images and scaled by the total batch (batch size x devices
    x accumulation) when the optimizer is built, as in the official code. Validation and test log ``top1``,
    ``top5`` (with >= 5 classes; in percent) and ``loss``; the test also keeps per-class accuracy and the
    confusion matrix in :attr:`test_results`. Checkpoints resume exactly on simmim's data modules (mixup's random
    stream included).
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        model_kwargs: dict[str, Any] | None = None,
        mode: str = "finetune",
        batch_size: int = 128,
        lr: float = 1.25e-3,
        warmup_lr: float = 2.5e-7,
        min_lr: float = 2.5e-7,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        warmup_epochs: float = 20,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        mixup_prob: float = 1.0,
        label_smoothing: float = 0.1,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        epochs: float | None = None,
        steps: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("finetune", "linear_probe"):
            raise ValueError(f"FinetuneModule mode must be finetune or linear_probe, got {mode!r}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
        self.save_hyperparameters()
        self.mode = mode
        self.model: SwinTransformerV2 = create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if mode == "linear_probe":
            # Official SimMIM-style probing: frozen encoder (norms included, eval mode), a linear layer on the
            # average-pooled features; no BatchNorm. Zero init as MAE/SimMIM probes (trunc-normal 0.01 in MAE).
            self.model.requires_grad_(False)
            self.model.head.requires_grad_(True)
            torch.nn.init.trunc_normal_(self.model.head.weight, std=0.01)
            torch.nn.init.zeros_(self.model.head.bias)
        self.mixup = Mixup(num_classes, mixup_alpha, cutmix_alpha, switch_prob, mixup_prob, label_smoothing, seed)
        self.soft_ce = SoftTargetCrossEntropy()
        self.label_smoothing = label_smoothing
        topk = (1, 5) if num_classes >= 5 else (1,)
        for split in ("val", "test"):
            metrics = {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in topk}
            setattr(self, f"{split}_metrics", torch.nn.ModuleDict(metrics))
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_results: dict[str, Any] = {}

    # ---- model -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.mode == "linear_probe":  # the frozen encoder stays in eval mode (norms, drop path, dropout)
            self.model.eval()
            self.model.head.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "linear_probe":
            with torch.no_grad():
                pooled = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            return self.model.head(pooled)
        return self.model(images)

    def load_pretrained(self, path: str | Path, trust_checkpoint: bool = False) -> LoadReport:
        """Load encoder weights of any layout (see :func:`simmim.checkpoint.load_pretrained`)."""
        return load_pretrained(self.model, path, trust_checkpoint=trust_checkpoint)

    # ---- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mode == "finetune" and self.mixup.active:
            images, targets = self.mixup(images, labels)
            loss = self.soft_ce(self(images), targets)
        else:
            loss = F.cross_entropy(self(images).float(), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=labels.shape[0])
        lr = max(g["lr"] for g in self.optimizers().param_groups)  # the head's, under layer-wise decay
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        logits = self(images).float()
        loss = F.cross_entropy(logits, labels)
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=labels.shape[0])
        for metric in getattr(self, f"{split}_metrics").values():
            metric.update(logits, labels)
        return logits

    def _log_accuracy(self, split: str) -> None:
        """Epoch accuracies in percent (torchmetrics syncs them across ranks)."""
        for name, metric in getattr(self, f"{split}_metrics").items():
            self.log(f"{split}/{name}", metric.compute() * 100, prog_bar=name == "top1")
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, "test")
        self.test_confusion.update(logits, batch["label"])

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")
        confusion = self.test_confusion.compute()
        support = confusion.sum(1)
        # accuracy per true class (recall), None for classes absent from the test set
        per_class = [None if n == 0 else 100 * c / n for c, n in zip(confusion.diag().tolist(), support.tolist())]
        for name, acc in zip(self.class_names, per_class):
            if acc is not None:
                self.log(f"test/acc_class/{name}", acc)
        self.test_results = {
            "per_class_top1": dict(zip(self.class_names, per_class)),
            "confusion_matrix": confusion.tolist(),
        }
        self.test_confusion.reset()

    # ---- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total_batch = hp.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        lr, warmup_lr, min_lr = (scale_lr(v, total_batch) for v in (hp.lr, hp.warmup_lr, hp.min_lr))
        if self.mode == "linear_probe":
            params = [{"params": list(self.model.head.parameters()), "lr": lr, "weight_decay": hp.weight_decay}]
            if hp.optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.momentum)
            else:
                opt = torch.optim.AdamW(params, lr=lr)
        elif hp.optimizer == "sgd":
            raise ValueError("fine-tuning uses AdamW (optim.name=adamw); sgd is for mode=linear_probe")
        else:
            opt = build_optimizer(self.model, lr, hp.weight_decay, hp.layer_decay, fused=fused_adamw_ok(self.trainer))
        epochs = hp.epochs or self.trainer.max_epochs
        if hp.steps:  # the run's length in steps: the schedule laid over it in its proportions
            total = hp.steps
        elif epochs is None or epochs < 0:  # a Trainer given max_steps alone: the schedule spans them
            epochs, total = 1, max(1, int(self.trainer.estimated_stepping_batches))
        else:
            self.trainer.fit_loop.setup_data()  # sizes the train loader, also under max_steps
            per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
            total = max(1, round(epochs * per_epoch))
        check_max_steps(self.trainer.max_steps, total, epochs, hp.steps)
        steps_per_epoch = total / epochs
        schedule = LRSchedule(total, int(hp.warmup_epochs * steps_per_epoch), warmup_lr, min_lr, "cosine")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": build_scheduler(opt, schedule), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- exact resume (simmim.callbacks.ExactResume) -----------------------------------------------------
    def loader_batch(self) -> int:
        return self.hparams.batch_size * self.trainer.world_size

    def schedule_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        keys = {"epochs": "schedule.epochs", "steps": "schedule.steps", "warmup_epochs": "schedule.warmup_epochs"}
        keys.update({k: f"optim.{k}" for k in ("lr", "warmup_lr", "min_lr", "layer_decay")})
        return {recipe_key: hparams[k] for k, recipe_key in keys.items() if k in hparams}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["simmim"]["mixup_rng"] = self.mixup.rng.bit_generator.state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("simmim", {}).get("mixup_rng")
        if state is not None:
            self.mixup.rng.bit_generator.state = state


# ---- command line ---------------------------------------------------------------------------------------


def _data_module(cfg: DictConfig) -> ClassificationDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return ClassificationDataModule(**data, img_size=cfg.model.img_size, seed=cfg.seed)


def _model_kwargs(cfg: DictConfig, windows: Sequence[int] | None) -> dict[str, Any]:
    kw = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    if kw.get("pretrained_window_sizes") is None:
        kw.pop("pretrained_window_sizes", None)
        if windows is not None:  # the weights' own windows: the official transfer rule, read from the checkpoint
            kw["pretrained_window_sizes"] = list(windows)
    return kw


def _save_confusion(matrix: list[list[int]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="test confusion matrix")
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _run_knn(cfg: DictConfig, windows: Sequence[int] | None, bf16: bool) -> dict[str, Any]:
    from simmim.eval import knn_evaluate

    if not cfg.pretrained:
        raise RecipeError("mode=knn evaluates pretrained weights: give pretrained=PATH")
    model = create_model(cfg.model.name, num_classes=0, **_model_kwargs(cfg, windows))
    report = load_pretrained(model, cfg.pretrained, trust_checkpoint=cfg.trust_checkpoint)
    print(report)
    dm = _data_module(cfg)
    dm.setup("validate")
    result = knn_evaluate(
        model, dm.train_eval_dataloader(), dm.val_dataloader(), cfg.knn.k, cfg.knn.temperature, dm.num_classes, bf16
    )
    return {"mode": "knn", "k": cfg.knn.k, "temperature": cfg.knn.temperature, "val": result}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run a resolved recipe; returns the final metrics (also written to ``<run dir>/metrics.json``)."""
    geometry = {k: cfg.model[k] for k in ("img_size", "window_size", "patch_size") if k in cfg.model}
    try:
        config = {"model": cfg.model.name, **MODEL_CONFIGS[cfg.model.name], **geometry}
    except KeyError:
        names = ", ".join(sorted(MODEL_CONFIGS))
        raise RecipeError(f"model.name={cfg.model.name!r} is not a known model; available: {names}") from None
    with run_runtime(cfg, config) as rt:
        return _run(cfg, rt)


def _run(cfg: DictConfig, rt: RunRuntime) -> dict[str, Any]:
    if cfg.mode not in MODES:
        raise RecipeError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    if "max_epochs" in trainer_kw:
        raise RecipeError("set schedule.epochs instead of trainer.max_epochs (the lr schedule is built from it)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    weights = read_pretrained(cfg.pretrained, cfg.trust_checkpoint) if cfg.pretrained else None
    windows = weights.window_sizes if weights is not None else None
    run_dir = resolve_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.mode == "knn" and cfg.resume:
        raise RecipeError("mode=knn trains nothing, so there is nothing to resume: leave resume unset")
    resume = start_run(cfg, run_dir)
    if cfg.mode == "knn":
        rt.log()
        save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
        metrics = {**_run_knn(cfg, windows, rt.precision.bf16), "run_dir": str(run_dir)}
        metrics["seconds"] = time.perf_counter() - start
        _write_json(metrics, run_dir / "metrics.json")
        return metrics
    if cfg.mode == "linear_probe" and weights is None:
        print("warning: linear probing random weights (no pretrained=PATH given)", file=sys.stderr)

    dm = _data_module(cfg)
    o, m = cfg.optim, cfg.mixup
    module = FinetuneModule(
        cfg.model.name, dm.num_classes, _model_kwargs(cfg, windows), cfg.mode, cfg.data.batch_size,
        o.lr, o.warmup_lr, o.min_lr, o.weight_decay, o.layer_decay, cfg.schedule.warmup_epochs, o.name, o.momentum,
        m.mixup_alpha, m.cutmix_alpha, m.switch_prob, m.prob, m.label_smoothing, dm.class_names,
        cfg.seed, cfg.schedule.epochs, cfg.schedule.get("steps"),
    )  # fmt: skip
    if cfg.compile:
        try:
            compile_model(module.model, cfg.compile_mode)
        except ValueError as e:
            raise RecipeError(str(e)) from e
    load = None
    if weights is not None:
        load = load_pretrained(module.model, weights)
        print(load)

    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    ckpt = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/top1", mode="max", save_on_train_epoch_end=False
    )
    every = int(cfg.checkpoint.every_n_steps)
    last = ModelCheckpoint(  # after best (its state is then current): last.ckpt every N steps, else each epoch
        dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=every if every > 0 else None
    )
    logs = run_dir / "logs"
    version = f"version_{sum(1 for p in logs.glob('version_*'))}"  # one folder per launch
    trainer_kw["precision"] = rt.precision.value
    trainer_kw["max_epochs"], trainer_kw["max_steps"] = run_length(
        cfg.schedule.epochs, cfg.schedule.get("steps"), trainer_kw.get("max_steps")
    )
    trainer = make_trainer(
        default_root_dir=run_dir,
        logger=[
            TensorBoardLogger(run_dir, name="logs", version=version, default_hp_metric=False),
            CSVLogger(logs, name=version, version="csv"),
        ],
        callbacks=[ckpt, last, NonFiniteGuard(cfg.nan_policy)],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module's sampler shards and seeds itself
        **trainer_kw,
    )
    if trainer.is_global_zero:  # DDP workers re-run this command: one process writes the run folder's files
        save_recipe(cfg, run_dir / "recipe.yaml", rt.resolved())
        if load is not None:
            (run_dir / "load_report.txt").write_text(str(load) + "\n")
    rt.log()
    with fit_context(run_dir):
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    if module.resumed_step != trainer.global_step:  # stopped by trainer.max_steps mid-epoch: resumable from here
        trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
    best = ckpt.best_model_path or None
    test_split = "val" if dm.test_source is dm.val_source else "test"  # no separate test split: the val set
    (result,) = trainer.test(module, dataloaders=dm.test_dataloader(), ckpt_path=best, weights_only=True)
    metrics = {
        "mode": cfg.mode,
        "recipe": cfg.recipe,
        "run_dir": str(run_dir),
        "pretrained": cfg.pretrained,
        "best_checkpoint": best,
        "best_val_top1": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "test_split": test_split,
        "test": {k.split("/", 1)[1]: v for k, v in result.items() if "acc_class" not in k},
        **module.test_results,
        "load_report": load.as_dict() if load is not None else None,
        "seconds": time.perf_counter() - start,
    }
    if trainer.is_global_zero:
        _write_json(metrics, run_dir / "metrics.json")
        _save_confusion(metrics["confusion_matrix"], module.class_names, run_dir / "confusion_matrix.png")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    show_bad_images_plainly()
    runtime.log_to_stderr()
    try:
        cfg = load_recipe("finetune", argv, default="quickstart")
        metrics = run(cfg)
    except DataError as e:  # found while training (possibly in a loader worker): its one-line summary
        print(f"error: {e.summary}", file=sys.stderr)
        return 2
    except (RecipeError, CheckpointError, OSError, ValueError) as e:  # OSError: a missing root or file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("confusion_matrix", "load_report")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
