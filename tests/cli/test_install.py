"""A regular (non-editable) install works from any folder: the wheel ships every recipe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_wheel_installed_into_a_fresh_venv_finds_every_recipe_and_trains(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)], check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("simmim-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import simmim.cli.recipes as r; print(r.__file__); print(r.recipes_dir());"
         "print(r.available_recipes('pretrain')); print(r.available_recipes('finetune'))"],
        cwd=elsewhere, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where  # the wheel's, not the checkout
    for kind in ("pretrain", "finetune"):
        shipped = sorted(p.stem for p in (ROOT / "recipes" / kind).glob("*.yaml") if not p.stem.startswith("_"))
        assert str(shipped) in where, (kind, where)
    res = subprocess.run(
        [python, "-m", "simmim.pretrain", "schedule.steps=2", "data.num_workers=0", "reconstructions=0",
         "visualize_every_n_steps=0", f"run_dir={elsewhere / 'run'}"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 2 steps" in res.stdout and (elsewhere / "run" / "encoder.safetensors").is_file()
