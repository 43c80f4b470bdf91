"""Image classification with a SwinV2 encoder: full fine-tuning and the linear probe, as two modules.

Fine-tuning follows the official recipe (SwinT main_simmim_ft.py, utils_simmim.py): AdamW with layer-wise lr decay
(applied once), no decay for norms, biases and the position-bias MLP, drop path, mixup / cutmix / label smoothing
with a soft-target cross-entropy. The linear probe trains a linear head on the frozen encoder's average-pooled
features (encoder in eval mode, no BatchNorm), with SGD or AdamW. Validation and test log ``top1``, ``top5`` (with
>= 5 classes; in percent) and ``loss``; the test also keeps per-class accuracy and the confusion matrix in
:attr:`ClassificationModule.test_results`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from simmim.models import SwinTransformerV2, create_model
from simmim.training.base import TrainingModule
from simmim.training.mixup import Mixup, SoftTargetCrossEntropy
from simmim.training.optim import build_optimizer, fused_adamw_ok

__all__ = ["ClassificationModule", "FinetuneModule", "LinearProbeModule"]


class ClassificationModule(TrainingModule):
    """A SwinV2 classifier with evaluation metrics; :class:`FinetuneModule` and :class:`LinearProbeModule` add how
    it trains.

    Args:
        model_config: the encoder's full config (``{"model": name, ...}``, as :mod:`simmim.models.registry` builds).
        num_classes / class_names: the classes (names default to their indices).
        optim / schedule: the recipe's sections (lrs per 512 images); batch_size: images per device and step.
        mixup: the recipe's ``mixup`` section (label smoothing is read from it by both modules).
        memory: runtime-only encoder options (``use_checkpoint``, ``attn_chunk_size``).
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        num_classes: int,
        optim: Mapping[str, Any],
        schedule: Mapping[str, Any],
        mixup: Mapping[str, Any],
        batch_size: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        memory: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.save_hyperparameters(
            {
                "model_config": dict(model_config),
                "num_classes": num_classes,
                "class_names": class_names,
                "optim": dict(optim),
                "schedule": dict(schedule),
                "mixup": dict(mixup),
                "batch_size": batch_size,
                "seed": seed,
            }
        )
        config = {k: v for k, v in model_config.items() if k != "model"}
        self.model: SwinTransformerV2 = create_model(
            model_config["model"], num_classes=num_classes, **config, **dict(memory or {})
        )
        self.class_names = class_names
        topk = (1, 5) if num_classes >= 5 else (1,)
        for split in ("val", "test"):
            metrics = {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in topk}
            setattr(self, f"{split}_metrics", torch.nn.ModuleDict(metrics))
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_results: dict[str, Any] = {}

    def load_pretrained(self, path: str | Path, trust_checkpoint: bool = False) -> Any:
        """Load encoder weights of any layout (see :func:`simmim.io.load_pretrained`)."""
        from simmim.io import load_pretrained

        return load_pretrained(self.model, path, trust_checkpoint=trust_checkpoint)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        loss = self.loss(images, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=labels.shape[0])
        self.log_lr()
        return loss

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss: cross-entropy with the recipe's label smoothing."""
        smoothing = self.hparams.mixup["label_smoothing"]
        return F.cross_entropy(self(images).float(), labels, label_smoothing=smoothing)

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
            "class_names": list(self.class_names),
            "per_class_top1": dict(zip(self.class_names, per_class)),
            "confusion_matrix": confusion.tolist(),
        }
        self.test_confusion.reset()


class FinetuneModule(ClassificationModule):
    """Full fine-tuning: every parameter trained, mixup / cutmix with soft targets, layer-wise lr decay; checkpoints
    keep mixup's random stream, so a resume draws the same mixes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m = self.hparams.mixup
        self.mixup = Mixup(
            self.hparams.num_classes, m["mixup_alpha"], m["cutmix_alpha"], m["switch_prob"], m["prob"],
            m["label_smoothing"], self.hparams.seed,
        )  # fmt: skip
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mixup / cutmix with soft targets when active, else cross-entropy with label smoothing."""
        if not self.mixup.active:
            return super().loss(images, labels)
        images, targets = self.mixup(images, labels)
        return self.soft_ce(self(images), targets)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        o = self.hparams.optim
        if o["name"] != "adamw":
            raise ValueError("fine-tuning uses AdamW (optim.name=adamw); sgd is for mode=linear_probe")
        return build_optimizer(
            self.model, lr=lr, weight_decay=o["weight_decay"], layer_decay=o["layer_decay"], betas=o["betas"],
            eps=o["eps"], official_wd_exemption_bug=o["official_wd_exemption_bug"], fused=fused_adamw_ok(self.trainer),
        )  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["simmim"]["mixup_rng"] = self.mixup.rng.bit_generator.state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("simmim", {}).get("mixup_rng")
        if state is not None:
            self.mixup.rng.bit_generator.state = state


class LinearProbeModule(ClassificationModule):
    """Official SimMIM-style linear probing: a frozen encoder (norms included, eval mode) and a linear head on its
    average-pooled features, zero-initialised biases and trunc-normal(0.01) weights as in MAE/SimMIM probes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model.requires_grad_(False)
        self.model.head.requires_grad_(True)
        torch.nn.init.trunc_normal_(self.model.head.weight, std=0.01)
        torch.nn.init.zeros_(self.model.head.bias)

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # the frozen encoder stays in eval mode (norms, drop path, dropout)
        self.model.head.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pooled = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return self.model.head(pooled)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        o = self.hparams.optim
        params = [{"params": list(self.model.head.parameters()), "lr": lr, "weight_decay": o["weight_decay"]}]
        if o["name"] == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o["momentum"])
        return torch.optim.AdamW(params, lr=lr, betas=tuple(o["betas"]), eps=o["eps"])
