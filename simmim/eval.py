"""Evaluating an encoder without fine-tuning it: pooled features, weighted kNN (k=20, T=0.07, the usual SSL
protocol of Wu et al. 2018 / DINO), and :class:`KNNMonitor`, a callback running it during pretraining."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from simmim.models.swinv2 import SwinTransformerV2

__all__ = [
    "extract_features",
    "knn_predict",
    "knn_accuracy",
    "knn_evaluate",
    "find_encoder",
]

Loader = Iterable[Any]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Dict batches (the data contract: ``image``, ``label``) or (images, labels) pairs."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


@torch.no_grad()
def extract_features(
    encoder: SwinTransformerV2, loader: Loader, device: torch.device | str | None = None, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised average-pooled final features [N, C] (float32, CPU) and labels [N] for every batch of
    ``loader``. The encoder runs in eval mode (its mode is restored afterwards)."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    feats, labels = [], []
    try:
        for batch in loader:
            x, y = _unpack(batch)
            with amp:
                f = encoder.forward_features(x.to(device, non_blocking=True)).mean(dim=(1, 2))
            feats.append(F.normalize(f.float(), dim=1).cpu())
            labels.append(y.cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features got an empty loader")
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [N, num_classes] by weighted voting of the ``k`` most cosine-similar training features,
    each vote weighted ``exp(sim / temperature)``. Features must be L2-normalised."""
    k = min(k, train_features.shape[0])
    scores = []
    for s in range(0, features.shape[0], chunk):
        sim = features[s : s + chunk] @ train_features.T
        top, idx = sim.topk(k, dim=1)
        votes = F.one_hot(train_labels[idx], num_classes).float() * (top / temperature).exp().unsqueeze(-1)
        scores.append(votes.sum(dim=1))
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) accuracy of :func:`knn_predict`, in percent."""
    num_classes = num_classes or int(max(train_labels.max(), labels.max())) + 1
    scores = knn_predict(train_features, train_labels, features, num_classes, k, temperature)
    out = {"top1": (scores.argmax(1) == labels).float().mean().item() * 100}
    if num_classes >= 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = (top5 == labels.unsqueeze(1)).any(1).float().mean().item() * 100
    return out


def knn_evaluate(
    encoder: SwinTransformerV2,
    train_loader: Loader,
    val_loader: Loader,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """kNN accuracy of ``encoder``'s pooled features: the labelled ``train_loader`` is the memory bank,
    ``val_loader`` the queries. Both loaders should use evaluation transforms."""
    tf, tl = extract_features(encoder, train_loader, bf16=bf16)
    vf, vl = extract_features(encoder, val_loader, bf16=bf16)
    return knn_accuracy(tf, tl, vf, vl, k, temperature, num_classes)


def find_encoder(module: torch.nn.Module) -> SwinTransformerV2:
    """The first SwinV2 inside ``module`` (e.g. ``pl_module.model.encoder`` of the pretraining module)."""
    for m in module.modules():
        if isinstance(m, SwinTransformerV2):
            return m
    raise ValueError(f"{type(module).__name__} contains no SwinTransformerV2")
