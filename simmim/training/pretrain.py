"""SimMIM pretraining of a SwinV2 encoder as a LightningModule.

Checkpoints keep the SimMIM model under ``model.``: encoder weights are ``model.encoder.<official key>``, the head
``model.decoder.*``; ``hyper_parameters["model_config"]`` (also the metadata of ``encoder.safetensors``) rebuilds
the encoder: ``create_model(cfg.pop("model"), **cfg)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from simmim.models.registry import RUNTIME_ONLY
from simmim.models.simmim import SimMIM, build_simmim
from simmim.training.base import TrainingModule
from simmim.training.optim import build_optimizer, fused_adamw_ok

__all__ = ["SimMIMPretrainModule", "RUNTIME_ONLY"]


class SimMIMPretrainModule(TrainingModule):
    """SimMIM pretraining: masked images in, masked-pixel L1 out.

    Args:
        model_config: the encoder's full config, ``{"model": name, embed_dim, depths, ..., img_size, window_size,
            drop_path_rate}`` (what ``encoder.safetensors`` records).
        norm_target / norm_target_patch_size: the official NORM_TARGET (locally normalised pixel targets).
        optim: the recipe's ``optim`` section (lr, warmup_lr and min_lr per 512 images, weight_decay, layer_decay,
            betas, eps, official_wd_exemption_bug, zero); schedule: its ``schedule`` section.
        batch_size: images per device and step, for the lr scaling; None reads the datamodule's.
        memory: runtime-only encoder options (``use_checkpoint``, ``attn_chunk_size``), not saved with the weights.
        init_from: weights to start from (any layout :func:`simmim.io.load_pretrained` reads), the pixel decoder and
            mask token included when the checkpoint has them.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        norm_target: bool,
        norm_target_patch_size: int,
        optim: Mapping[str, Any],
        schedule: Mapping[str, Any],
        batch_size: int | None = None,
        memory: Mapping[str, Any] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        config = {k: v for k, v in model_config.items() if k not in RUNTIME_ONLY}
        kwargs = {k: v for k, v in config.items() if k != "model"}
        self.save_hyperparameters(
            {
                "model_config": config,
                "model_kwargs": kwargs,  # read by older tools; model_config is complete
                "norm_target": norm_target,
                "norm_target_patch_size": norm_target_patch_size,
                "optim": dict(optim),
                "schedule": dict(schedule),
                "batch_size": batch_size,
                "init_from": init_from,
            }
        )
        self.model: SimMIM = build_simmim(
            config["model"], norm_target=norm_target, norm_target_patch_size=norm_target_patch_size,
            **kwargs, **dict(memory or {}),
        )  # fmt: skip
        self.load_report = None
        if init_from:  # a SimMIM checkpoint's pixel decoder and mask token are taken too
            from simmim.io import load_pretrained

            self.load_report = load_pretrained(self.model, init_from)
        self._param_ndims = {n: p.ndim for n, p in self.model.named_parameters()}  # before FSDP flattens them

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(image, mask)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"], batch["mask"])
        # mean over processes (every image has the same number of masked pixels): the loss of the global batch
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["image"]), sync_dist=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"], batch["mask"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        o = self.hparams.optim
        return build_optimizer(
            self.model,
            lr=lr,
            weight_decay=o["weight_decay"],
            layer_decay=o["layer_decay"],
            betas=o["betas"],
            eps=o["eps"],
            official_wd_exemption_bug=o["official_wd_exemption_bug"],
            ndims=self._param_ndims,
            fused=fused_adamw_ok(self.trainer),
        )
