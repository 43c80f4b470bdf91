"""A user's first hour (issue 19), through the real command lines in subprocesses: every documented option works,
every bad value is refused up front (one ``error:`` line naming the key and what to do, exit 2, no run folder left
behind), nothing is lost silently, and the output is free of noise."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_args, write_images


def cli(kind: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", f"simmim.{kind}", *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=cwd,
    )  # fmt: skip


def metrics(run_dir: Path) -> list[dict[str, str]]:
    (path,) = sorted(run_dir.glob("logs/version_*/csv/metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("first_hour") / "images", 40)


@pytest.mark.parametrize(
    "args, key, advice",
    [
        (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5", "must lie in [0, 1)"),
        (["optim.lr=-1"], "optim.lr=-1", "must be > 0"),
        (["data.crop_scale=[1.5,0.2]"], "data.crop_scale=[1.5, 0.2]", "0 < low <= high <= 1"),
        (["schedule.steps=0"], "schedule.steps=0", "or null for a run of schedule.epochs"),
        (["schedule.steps=-5"], "schedule.steps=-5", "must be >= 1"),
        (["data.mask_ratio=0.99"], "data.mask_ratio=0.99", "nothing is left visible"),
        (["data.mask_patch_size=32"], "data.mask_patch_size=32", "lower data.mask_ratio or data.mask_patch_size"),
        (["schedule.warmup_epochs=2"], "schedule.warmup_epochs=2", "not shorter than the run"),
        (["trainer.precision=fp8"], "trainer.precision='fp8'", "is not one of auto"),
        (["data.batchsize=3"], "data.batchsize", "did you mean data.batch_size?"),
        (["threads=0"], "threads=0", "or auto"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, args, key, advice):
    run_dir = tmp_path / "run"
    res = cli("pretrain", *args, f"run_dir={run_dir}")
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: ") and key in line and advice in line, line
    assert not run_dir.exists()


def test_resume_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    res = cli("pretrain", f"resume={text}", f"run_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(text) in line


def test_finetune_takes_the_documented_val_and_test_roots(tmp_path):
    res = cli("finetune", "--dry-run", f"data.val_root={tmp_path}", f"data.test_root={tmp_path}", "pretrained=x")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"val_root: {tmp_path}" in res.stdout and f"test_root: {tmp_path}" in res.stdout


def test_help_lists_every_key_with_its_default_and_comment():
    res = cli("pretrain", "--help")
    assert res.returncode == 0
    assert "mask_ratio: 0.6" in res.stdout and "fraction of blocks masked" in res.stdout
    assert "--dry-run" in res.stdout and "quickstart" in res.stdout


def test_dry_run_prints_the_recipe_and_the_plan_and_trains_nothing(images, tmp_path):
    run_dir = tmp_path / "run"
    res = cli("pretrain", "--dry-run", f"data.root={images}", "data.batch_size=8", "schedule.steps=12",
              f"run_dir={run_dir}")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "batch_size: 8" in out and "schedule: 12 optimizer steps (schedule.steps), cosine" in out
    assert "precision: auto ->" in out and "threads" in out and "memory=manual" in out
    assert not run_dir.exists()


def test_multirun_sweeps_each_combination_in_its_own_folder(images, tmp_path):
    base = pretrain_args(images, tmp_path / "sweep", "data.batch_size=8", "trainer.max_steps=2", "schedule.epochs=1")
    res = cli("pretrain", "--multirun", *base, "optim.lr=0.1,0.2")
    assert res.returncode == 0, res.stderr[-3000:]
    for i, lr in enumerate((0.1, 0.2)):
        recipe = (tmp_path / "sweep" / str(i) / "recipe.yaml").read_text()
        assert f"lr: {lr}" in recipe
    assert "run 2/2: " in res.stderr


@pytest.mark.slow
def test_a_short_run_validates_at_its_end_logs_train_loss_and_records_what_auto_became(images, tmp_path):
    """schedule.steps shorter than an epoch never reaches val_check_interval=0.5: the run validates at its end;
    metrics.csv has the documented train/loss, lr and train/grad_norm at every step of a 6-step run."""
    run_dir = tmp_path / "run"
    args = [f"data.root={images}", "data.val_fraction=0.2", "data.batch_size=4", "data.num_workers=0",
            "schedule.steps=6", "trainer.val_check_interval=0.5", "trainer.log_every_n_steps=50",
            "checkpoint.every_n_steps=0", "reconstructions=0", "visualize_every_n_steps=0",
            f"run_dir={run_dir}"]  # fmt: skip
    res = cli("pretrain", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(run_dir)
    assert any(r.get("val/loss") for r in rows)
    for key in ("train/loss", "lr", "train/grad_norm"):
        assert len([r for r in rows if r.get(key)]) >= 5, key
    assert not any("train/loss_step" in r or "train/loss_epoch" in r for r in rows)
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "precision: auto" in recipe and "resolved:" in recipe and "machine:" in recipe
    # no noise: Lightning's tips and deprecations are silenced, the run's own lines stay
    for noise in ("Tip:", "LeafSpec", "Total FLOPs", "log_every_n_steps", "TPU available"):
        assert noise not in res.stderr, noise
    assert "precision: auto -> " in res.stderr and "threads: " in res.stderr
    assert "done: 6 steps" in res.stdout and "val loss" in res.stdout


@pytest.mark.slow
def test_trainer_arguments_that_were_refused_now_work(images, tmp_path):
    base = pretrain_args(images, tmp_path / "a", "data.batch_size=8", "trainer.max_steps=2", "schedule.epochs=1")
    res = cli("pretrain", *base, "trainer.logger=false", "trainer.callbacks=[]",
              f"trainer.default_root_dir={tmp_path / 'root'}", "trainer.enable_checkpointing=false")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "a" / "logs").exists() and not (tmp_path / "a" / "checkpoints").exists()
    assert (tmp_path / "a" / "encoder.safetensors").is_file()
    callback = "{_target_: pytorch_lightning.callbacks.LearningRateMonitor}"
    args = pretrain_args(images, tmp_path / "b", "data.batch_size=8", "trainer.max_steps=2", "schedule.epochs=1")
    res = cli("pretrain", *args, f"trainer.callbacks=[{callback}]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(r.get("lr-AdamW/pg1") for r in metrics(tmp_path / "b"))  # the user's callback ran
