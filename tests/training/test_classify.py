"""The classification modules (real Trainer.fit / test on small data): layer-wise lr decay groups, mixup, the
linear probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, Dataset

from simmim.cli.finetune import encoder_config
from simmim.cli.recipes import load_recipe
from simmim.io import save_encoder
from simmim.models.simmim import build_simmim
from simmim.training.classify import FinetuneModule, LinearProbeModule

TINY = dict(img_size=32, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


class ColourDataset(Dataset):
    """Dict batches whose mean colour is the class."""

    def __init__(self, n: int, num_classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        colours = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(42))
        self.images = colours[self.labels].view(n, 3, 1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return quiet_trainer(**{"max_epochs": 1, "default_root_dir": tmp_path, "gradient_clip_val": 5.0, **kw})


def module(cls=FinetuneModule, num_classes: int = 3, *overrides: str):
    """``cls`` over the quickstart recipe with a 16-channel nano encoder, batch 8, one warmup epoch, ``overrides``."""
    geometry = ("model.embed_dim=16", "model.depths=[1,1,2,1]", "model.num_heads=[1,2,2,4]")
    cfg = load_recipe("finetune", [*geometry, "schedule.warmup_epochs=1", *overrides])
    sections = {k: dict(cfg[k]) for k in ("optim", "schedule", "mixup")}
    return cls(encoder_config(cfg), num_classes, **sections, batch_size=8)


def test_layer_decay_groups_follow_the_official_rule(tmp_path):
    """Peak lr of every parameter = lr * total_batch / 512 * 0.75 ** (L - 1 - layer_id), L = sum(depths) + 2 = 7."""
    m = module(FinetuneModule, 3, "optim.lr=1e-3", "optim.layer_decay=0.75", "optim.weight_decay=0.05")
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(m, DataLoader(ColourDataset(8), batch_size=8))
    expected_id = {
        "patch_embed.proj.weight": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1,
        "layers.0.downsample.reduction.weight": 1,  # sum(depths[:1])
        "layers.1.blocks.0.mlp.fc1.weight": 2,
        "layers.1.downsample.norm.weight": 2,
        "layers.2.blocks.0.attn.q_bias": 3,
        "layers.2.blocks.1.attn.cpb_mlp.0.weight": 4,
        "layers.2.downsample.reduction.weight": 4,
        "layers.3.blocks.0.attn.logit_scale": 5,
        "norm.weight": 6,
        "head.weight": 6,
    }
    peak = 1e-3 * 8 / 512
    groups = {n: g for g in t.optimizers[0].param_groups for n in g["param_names"]}
    for name, lid in expected_id.items():
        assert groups[name]["initial_lr"] == pytest.approx(peak * 0.75 ** (6 - lid)), name
    decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.05}
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    for exempt in ("layers.2.blocks.0.attn.q_bias", "layers.2.blocks.1.attn.cpb_mlp.0.weight", "norm.weight",
                   "layers.3.blocks.0.attn.logit_scale", "head.bias"):  # fmt: skip
        assert exempt not in decayed, exempt
    assert len(groups) == sum(1 for _ in m.model.parameters())


def test_fit_validate_test_with_mixup(tmp_path):
    torch.manual_seed(0)
    m = module(FinetuneModule, 5, "optim.lr=5e-3", "optim.layer_decay=0.9")
    t = trainer(tmp_path, max_epochs=2, limit_train_batches=3)
    train = DataLoader(ColourDataset(24, 5), batch_size=8, shuffle=True)
    val = DataLoader(ColourDataset(20, 5, seed=1), batch_size=10)
    t.fit(m, train, val)
    assert {"train/loss", "val/top1", "val/top5", "val/loss"} <= set(t.logged_metrics)
    (result,) = t.test(m, val, verbose=False)
    assert 0 <= result["test/top1"] <= 100 and result["test/top5"] >= result["test/top1"]
    cm = np.array(m.test_results["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 20
    assert set(m.test_results["per_class_top1"]) == {"0", "1", "2", "3", "4"}


def test_linear_probe_trains_only_the_head(tmp_path):
    simmim = build_simmim("swinv2_nano", **{k: v for k, v in TINY.items()})
    path = save_encoder(simmim.encoder.state_dict(), tmp_path / "encoder.safetensors", {"img_size": 32})
    probe = ("mode=linear_probe", "optim.name=sgd", "optim.lr=0.5", "mixup.mixup_alpha=0", "mixup.cutmix_alpha=0")
    m = module(LinearProbeModule, 3, *probe)
    report = m.load_pretrained(path)
    assert report.missing == ["head.weight", "head.bias"]
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    t = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.training, pl_module.model.layers[0].training, pl_module.model.head.training))

    t.callbacks.append(Spy())
    t.fit(m, DataLoader(ColourDataset(16), batch_size=8))
    assert set(modes) == {(False, False, True)}  # encoder (norms, drop path) in eval mode, head training
    after = m.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert len(t.optimizers[0].param_groups[0]["params"]) == 2
