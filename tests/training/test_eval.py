"""kNN evaluation: the voting rule, feature extraction and the KNNMonitor callback in a real Trainer.fit."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch.utils.data import DataLoader, Dataset

from simmim.eval import extract_features, knn_accuracy, knn_predict
from simmim.models import create_model
from simmim.models.simmim import build_simmim
from simmim.training.callbacks import KNNMonitor


def test_knn_on_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)

    def sample(n):
        labels = torch.arange(n) % 4
        return F.normalize(centres[labels] + 0.05 * torch.randn(n, 16, generator=g), dim=1), labels

    bank, bank_labels = sample(200)
    queries, labels = sample(50)
    assert knn_accuracy(bank, bank_labels, queries, labels) == {"top1": 100.0}


def test_knn_votes_are_temperature_weighted():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    query = F.normalize(torch.tensor([[1.0, 0.9]]), dim=1)
    scores = knn_predict(bank, torch.tensor([0, 1, 1]), query, num_classes=2, k=3, temperature=0.5)
    sims = query @ bank.T
    expected = torch.stack([(sims[0, 0] / 0.5).exp(), 2 * (sims[0, 1] / 0.5).exp()])
    torch.testing.assert_close(scores[0], expected)
    assert scores.argmax().item() == 1  # two slightly less similar neighbours outvote one


class ColourDataset(Dataset):
    """Images whose mean colour is the label (plus noise): easy for any encoder's pooled features."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        colours = torch.eye(3) * 2 - 1
        self.images = colours[self.labels].view(n, 3, 1, 1) + 0.3 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "mask": torch.zeros(8, 8, dtype=torch.long)}


def test_extract_features_normalised_and_mode_restored():
    model = create_model("swinv2_nano", img_size=32, num_classes=0).train()
    feats, labels = extract_features(model, DataLoader(ColourDataset(10), batch_size=4))
    assert feats.shape == (10, 256) and labels.shape == (10,)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert model.training


class TinyPretrain(pl.LightningModule):
    """A minimal SimMIM LightningModule, laid out like the pretraining one (``model.encoder``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_simmim("swinv2_nano", img_size=32)

    def training_step(self, batch, batch_idx):
        mask = (torch.rand(batch["image"].shape[0], 8, 8) < 0.6).long()
        return self.model(batch["image"], mask)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_knn_monitor_logs_during_fit(tmp_path):
    train = DataLoader(ColourDataset(24, seed=1), batch_size=8)
    monitor = KNNMonitor(lambda: DataLoader(ColourDataset(30, seed=2), batch_size=16), train, every_n_epochs=2)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.fit(TinyPretrain(), train)
    assert [epoch for epoch, _ in monitor.history] == [1]  # every 2 epochs: after the second only
    assert "knn/top1" in trainer.logged_metrics
    assert trainer.logged_metrics["knn/top1"] > 90  # colours separate even with random-ish weights


def test_knn_monitor_from_datamodule(tmp_path):
    """The memory bank of a ClassificationDataModule: its training images with evaluation transforms."""
    import numpy as np
    from PIL import Image

    from simmim.data import ClassificationDataModule

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / split / name / f"{i}.png")
    make = lambda: ClassificationDataModule(tmp_path, img_size=32, batch_size=4, num_workers=0)
    monitor = KNNMonitor.from_datamodule(make, k=5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.fit(TinyPretrain(), DataLoader(ColourDataset(8), batch_size=8))
    assert monitor.history[0][1] == {"top1": 100.0}


def test_pretraining_recipe_logs_knn_accuracy(image_folder, tmp_path):
    """knn.root in a pretraining recipe adds the monitor: knn/top1 lands in the run's CSV metrics."""
    import csv

    from conftest import write_images

    from simmim.cli.pretrain import run
    from simmim.cli.recipes import load_recipe

    labelled = tmp_path / "labelled"
    for seed, (split, c, n) in enumerate([("train", "a", 6), ("train", "b", 6), ("val", "a", 3), ("val", "b", 3)]):
        write_images(labelled / split / c, n, size=32, seed=seed)
    args = [
        f"data.root={image_folder}", "data.source=folder", "data.val_fraction=0.0", "data.batch_size=8",
        "data.num_workers=0", "schedule.epochs=1", "trainer.limit_train_batches=2", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=0", "reconstructions=0",
        "visualize_every_n_steps=0", f"knn.root={labelled}", "knn.batch_size=4", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run(load_recipe("pretrain", args))
    (metrics,) = (tmp_path / "run" / "logs").glob("version_*/csv/metrics.csv")
    values = [float(r["knn/top1"]) for r in csv.DictReader(open(metrics)) if r.get("knn/top1")]
    assert len(values) == 1 and 0.0 <= values[0] <= 100.0
