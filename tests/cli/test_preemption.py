"""Preemption: SIGTERM or SIGUSR1 during a real pretraining saves a checkpoint and exits cleanly with a message;
``resume=auto`` then continues exactly. Under SLURM, SIGUSR1 also requeues the job (``scontrol requeue``; SLURM's
own program cannot run here, so a stand-in on PATH records how it was called)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pretrain_args

from simmim.cli.pretrain import run
from simmim.cli.recipes import load_recipe


def _args(folder: Path, run_dir: Path, *extra: str) -> list[str]:
    return pretrain_args(folder, run_dir, "data.batch_size=4", "model.drop_path_rate=0.1", "schedule.epochs=3",
                         "trainer.max_steps=14", "checkpoint.every_n_steps=3", *extra)  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("logs/version_*/csv/metrics.csv")):
        with open(path) as f:
            out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return out


def _signal_once_checkpointed(args: list[str], run_dir: Path, sig: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "simmim.pretrain", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step=000003.ckpt").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(load_recipe("pretrain", _args(image_folder, run_dir)))
    return _losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_exits_cleanly_and_resume_auto_continues_exactly(reference, image_folder, tmp_path, sig):
    run_dir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = _signal_once_checkpointed(_args(image_folder, run_dir), run_dir, sig, env)
    out, err = proc.communicate(timeout=240)
    name = signal.Signals(sig).name
    assert proc.returncode == 0, err[-3000:]
    assert f"stopped by {name} at step" in out and "resume=auto" in out, out
    step = int(out.split("at step ")[1].split(":")[0])
    assert 3 <= step < 14 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    if sig == signal.SIGUSR1:
        assert calls.read_text().split() == ["requeue", "4242"]
    else:
        assert not calls.exists()
    # the requeued job (or the user) reruns the command with resume=auto
    res = subprocess.run([sys.executable, "-m", "simmim.pretrain", *_args(image_folder, run_dir), "resume=auto"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 14 steps" in res.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(14))
    for s, loss in losses.items():
        assert loss == pytest.approx(reference[s], abs=1e-6), s
