"""Shared fixtures: small real image files on disk."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from simmim import runtime

runtime.prepare_process()  # passive OpenMP waiting, before torch loads (DataLoader workers share the cores)
# inductor's kernel cache per imitated CPU class: kernels compiled under ATEN_CPU_CAPABILITY=avx2 and natively share
# cache keys, and a kernel of the other class gave wrong outputs (tests/kernels/test_linear.py, compiled runs)
_imitated = "-".join(os.environ.get(v, "") for v in runtime.IMITATION_VARIABLES).strip("-")
if _imitated:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor-{_imitated}"))


def write_images(folder, n: int, size: int = 40, seed: int = 0):
    """``n`` PNGs of ``size`` px: smooth colour gradients with a few solid rectangles (learnable structure)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 * (1 - xx[..., None]) + c1 * yy[..., None]
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 8, 2)
            w, h = rng.integers(4, 16, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """24 small RGB PNGs in a flat folder."""
    return write_images(tmp_path_factory.mktemp("images"), 24)


def quiet_trainer(**kwargs):
    """A CPU ``pl.Trainer`` for tests: no logger, checkpoints, progress bar or model summary, and no distributed
    sampler (our data modules shard themselves); ``kwargs`` add to or override these."""
    import pytorch_lightning as pl

    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


def pretrain_module(overrides=(), schedule=None, batch_size=8):
    """SimMIMPretrainModule of the quickstart recipe (swinv2_nano at 32 px, no drop path) with recipe
    ``overrides`` and ``schedule`` keys (``{"name": "cosine", "epochs": 2}``), for ``batch_size`` images a step."""
    from simmim.cli.pretrain import build_module
    from simmim.cli.recipes import load_recipe

    schedule = {"milestones": "[]", **(schedule or {})}
    schedule = [f"schedule.{k}={v}" for k, v in schedule.items()]
    return build_module(load_recipe("pretrain", ["model.drop_path_rate=0.0", f"data.batch_size={batch_size}",
                                                 *overrides, *schedule]))  # fmt: skip


def fit_tiny_pretraining(folder, schedule: dict, callbacks=(), **trainer_kwargs):
    """A real Trainer.fit of SimMIM swinv2_nano at 32 px on ``folder`` (batch 8, lr 0.5 per 512, no logger);
    returns the module and the per-step training losses."""
    import pytorch_lightning as pl

    from simmim.data import PretrainDataModule

    pl.seed_everything(0)
    dm = PretrainDataModule(folder, "folder", img_size=32, mask_patch_size=8, batch_size=8, num_workers=0)
    module = pretrain_module(["optim.lr=0.5", "optim.warmup_lr=0", "optim.min_lr=0"], schedule, batch_size=8)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = quiet_trainer(callbacks=[Record(), *callbacks], **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    return module, losses


def pretrain_args(folder, run_dir, *extra):
    """CLI arguments of a small fp32 pretraining (quickstart recipe, swinv2_nano at 32 px) on a flat image
    ``folder``, logging every step and keeping every checkpoint; ``extra`` overrides (later keys win)."""
    return [
        "recipe=quickstart",
        f"data.root={folder}",
        "data.source=folder",
        "data.val_fraction=0.0",
        "data.num_workers=0",
        "model.drop_path_rate=0.0",
        "optim.lr=0.2",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0.5",
        "trainer.limit_train_batches=1.0",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_all=true",
        "reconstructions=0",
        f"run_dir={run_dir}",
        *extra,
    ]


def kill_once_written(module: str, args, path) -> int:
    """Runs ``python -m module args`` and SIGKILLs it as soon as ``path`` exists (a crash mid-run); returns its pid.
    Fails if the run ended before that."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return proc.pid
