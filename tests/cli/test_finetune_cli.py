"""The fine-tuning command line: fine-tuning from an encoder file, kNN, errors, exact resume (also with two
processes)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_once_written
from PIL import Image

from simmim.cli.finetune import run
from simmim.cli.recipes import load_recipe
from simmim.io import load_pretrained, save_encoder
from simmim.models import create_model
from simmim.models.simmim import build_simmim

TINY = dict(img_size=32, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


# ---- the command line --------------------------------------------------------------------------------


def write_imagefolder(root: Path, n_per_class: int, seed: int) -> None:
    """Three colour classes of small PNGs with noise, in ImageFolder layout."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "train", 8, 0)
    write_imagefolder(root / "val", 4, 1)
    write_imagefolder(root / "test", 3, 2)
    simmim = build_simmim("swinv2_nano", img_size=32)
    save_encoder(simmim.encoder.state_dict(), root / "encoder.safetensors", {"model": "swinv2_nano", "img_size": 32})
    return root


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "simmim.finetune", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_finetunes_from_an_encoder_file(folders, tmp_path):
    out = run_cli(
        "recipe=quickstart", f"pretrained={folders / 'encoder.safetensors'}", f"data.root={folders}",
        "data.source=imagefolder", "data.batch_size=8", "data.num_workers=0", "data.label_fraction=1.0",
        "schedule.epochs=2",
        f"run_dir={tmp_path / 'ft'}", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ft"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_split"] == "test" and metrics["epochs"] == 2
    assert 0 <= metrics["test"]["top1"] <= 100 and "top5" not in metrics["test"]  # 3 classes: no top-5
    assert np.array(metrics["confusion_matrix"]).sum() == 9
    assert metrics["load_report"]["missing"] == ["head.weight", "head.bias"]
    assert Path(metrics["best_checkpoint"]).name == "best.ckpt" and Path(metrics["best_checkpoint"]).is_file()
    assert (run / "recipe.yaml").is_file() and (run / "confusion_matrix.png").is_file()
    # The best checkpoint loads back as pretrained weights (Lightning layout, head included).
    m = create_model("swinv2_nano", img_size=32, window_size=4, num_classes=3)
    assert load_pretrained(m, metrics["best_checkpoint"]).missing == []
    # The same run folder again: refused before anything is overwritten.
    before = (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    again = run_cli(f"run_dir={run}", f"data.root={folders}", "data.source=imagefolder", cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds checkpoints of an earlier run (best.ckpt, last.ckpt): pass resume=auto" in again.stderr
    assert (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns == before


def test_cli_errors_are_one_clear_line(folders, tmp_path):
    text = tmp_path / "weights.ckpt"
    text.write_text("not weights\n")
    out = run_cli(f"pretrained={text}", f"data.root={folders}", f"output_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr
    assert "not a checkpoint (it looks like a text file)" in out.stderr
    out = run_cli("optim.lrr=1", cwd=tmp_path)
    assert out.returncode == 2 and "did you mean optim.lr" in out.stderr


def test_cli_knn(folders, tmp_path):
    out = run_cli(
        "recipe=knn", f"pretrained={folders / 'encoder.safetensors'}", f"data.root={folders}",
        "data.batch_size=64", "data.num_workers=0",  # more than the 24 training images: kNN trains nothing
        "knn.k=50", f"run_dir={tmp_path / 'knn'}", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert metrics["mode"] == "knn" and metrics["val"]["top1"] > 90  # colour classes: separable even untrained
    # what it did: k clamped to the 24-image memory bank (and said so), the sizes, the weights and their report
    assert (metrics["k"], metrics["k_requested"], metrics["bank_images"], metrics["query_images"]) == (24, 50, 24, 12)
    assert "knn.k=50 is more than the 24 images of the memory bank" in out.stderr
    assert metrics["pretrained"] == str(folders / "encoder.safetensors") and metrics["load_report"]["loaded"] > 0
    assert metrics["class_names"] == ["blue", "green", "red"]
    assert "loaded" in (tmp_path / "knn" / "load_report.txt").read_text()


# ---- exact resume ---------------------------------------------------------------------------------------------


def resume_args(folders: Path, run_dir: Path, *extra: str) -> list[str]:
    """24 images, batch 4: 6 steps an epoch, 2 epochs; mixup, cutmix and drop path draw random numbers."""
    return [
        "recipe=quickstart", f"pretrained={folders / 'encoder.safetensors'}", f"data.root={folders}",
        "data.source=imagefolder", "data.batch_size=4", "data.num_workers=0", "data.label_fraction=1.0",
        "model.drop_path_rate=0.2", "schedule.epochs=2", "trainer.log_every_n_steps=1", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


def step_losses(run_dir: Path) -> dict[int, float]:
    """{global step: training loss} of the run's last launch (CSV logs)."""
    last = max((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(last / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def whole_run(folders, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("whole")
    return run_dir, run(load_recipe("finetune", resume_args(folders, run_dir)))


def test_fine_tuning_stopped_by_max_steps_resumes_exactly(folders, whole_run, tmp_path):
    """trainer.max_steps=5 stops inside the first epoch; resume=auto continues with its batch 6, with the mixup,
    cutmix and drop-path draws of the uninterrupted run, and ends with its test result."""
    whole_dir, whole = whole_run
    pieces = resume_args(folders, tmp_path)
    run(load_recipe("finetune", [*pieces, "trainer.max_steps=5"]))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    out = run(load_recipe("finetune", [*pieces, "resume=auto"]))
    ref, resumed = step_losses(whole_dir), step_losses(tmp_path)
    assert sorted(ref) == list(range(12)) and sorted(resumed) == list(range(5, 12))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), step
    assert out["steps"] == whole["steps"] == 12 and out["test"] == pytest.approx(whole["test"], abs=1e-6)
    assert out["best_val_top1"] == pytest.approx(whole["best_val_top1"])


def test_float32_fine_tuning_resumes_exactly(folders, tmp_path):
    """The same in float32, where the linear layers run on oneDNN (simmim.kernels.linear): bit-identical losses."""
    fp32 = ("trainer.precision=32",)
    run(load_recipe("finetune", resume_args(folders, tmp_path / "whole", *fp32)))
    run(load_recipe("finetune", resume_args(folders, tmp_path / "pieces", *fp32, "trainer.max_steps=5")))
    run(load_recipe("finetune", resume_args(folders, tmp_path / "pieces", *fp32, "resume=auto")))
    ref, resumed = step_losses(tmp_path / "whole"), step_losses(tmp_path / "pieces")
    assert sorted(resumed) == list(range(5, 12)) and all(resumed[s] == ref[s] for s in resumed), (ref, resumed)


@pytest.mark.slow
def test_fine_tuning_killed_mid_epoch_resumes_from_its_step_checkpoint(folders, whole_run, tmp_path):
    """checkpoint.every_n_steps=4 writes last.ckpt at steps 4 and 8: a run killed after the first resumes there."""
    args = resume_args(folders, tmp_path, "checkpoint.every_n_steps=4")
    kill_once_written("simmim.finetune", args, tmp_path / "checkpoints" / "last.ckpt")
    res = run_cli(*args, "resume=auto", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, resumed = step_losses(whole_run[0]), step_losses(tmp_path)
    assert min(resumed) in (4, 8) and max(resumed) == 11
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), step
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == pytest.approx(whole_run[1]["test"], abs=1e-6)


def test_knn_refuses_resume(folders, tmp_path):
    out = run_cli("recipe=knn", f"data.root={folders}", f"run_dir={tmp_path}", "resume=auto", cwd=tmp_path)
    assert out.returncode == 2 and "mode=knn trains nothing" in out.stderr


@pytest.mark.slow
def test_two_process_fine_tuning_writes_one_run_folder_and_resumes_exactly(folders, tmp_path):
    """trainer.devices=2 (DDP on CPU): Lightning re-runs the command for the second process, which must find the
    first one's timestamped run folder; a 2-process run stopped by max_steps resumes with the same losses."""
    ddp = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2")

    def args(*extra):
        return [a for a in resume_args(folders, Path("unused"), *ddp) if not a.startswith("run_dir=")] + list(extra)

    whole = run_cli(*args(f"output_dir={tmp_path / 'out'}"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (run,) = (tmp_path / "out" / "quickstart").iterdir()  # one folder, not one per process
    assert (run / "metrics.json").is_file() and (run / "recipe.yaml").is_file()
    pieces = tmp_path / "pieces"
    first = run_cli(*args(f"run_dir={pieces}", "trainer.max_steps=5"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*args(f"run_dir={pieces}", "resume=auto"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    ref, resumed = step_losses(run), step_losses(pieces)
    assert sorted(ref) == list(range(12)) and sorted(resumed) == list(range(5, 12))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-5), step
