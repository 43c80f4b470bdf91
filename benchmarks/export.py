"""How long ``python -m simmim.export`` takes per format, end to end (a fresh process, as a user runs it).

    python benchmarks/export.py                              # SwinV2-B at 192 px, window 12: the issue's target
    python benchmarks/export.py --model swinv2_nano --img-size 32 --window 4
    python benchmarks/export.py --source runs/pretrain/x     # time exports of an existing run folder or file

Without ``--source`` the source is a real pretraining run of one step (``python -m simmim.pretrain``, fp32, on
a few generated images), so the exports read a genuine Lightning checkpoint: weights, mask token, pixel decoder and
AdamW state. Each format is exported once from its own process; the table gives the process's wall clock, its CPU
time (user + system over its threads: what stays meaningful on a shared machine) and the export's own time (what the
command prints, without Python start-up and imports).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("hf", "timm", "official", "onnx")


def _images(folder: Path, n: int = 4, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def make_run(folder: Path, model: str, img_size: int, window: int) -> Path:
    """A one-step pretraining run folder of ``model`` (the CLI in a subprocess)."""
    run = folder / "run"
    mask = 32 if img_size % 32 == 0 and img_size > 32 else 8  # masks must leave cells visible
    args = [
        f"data.root={_images(folder / 'images')}", "data.source=folder", "data.batch_size=2", "data.num_workers=0",
        "data.val_fraction=0.0", f"data.mask_patch_size={mask}", f"model.name={model}", f"model.img_size={img_size}",
        f"model.window_size={window}", "model.norm_target=false", "schedule.steps=1", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "reconstructions=0",
        "visualize_every_n_steps=0", f"run_dir={run}",
    ]  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"pretraining the source failed:\n{res.stderr[-3000:]}")
    return run


def time_export(source: Path, fmt: str, out: Path) -> tuple[float, float, float]:
    """(process wall clock, its CPU time (user + system, all threads), the export's own seconds as printed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "simmim.export", str(source), "--to", fmt, "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if res.returncode != 0:
        raise SystemExit(f"--to {fmt} failed:\n{res.stderr[-3000:]}")
    own = re.search(r"in ([\d.]+) s$", res.stdout.strip())
    return wall, cpu, float(own.group(1)) if own else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="swinv2_base")
    ap.add_argument("--img-size", type=int, default=192)
    ap.add_argument("--window", type=int, default=12)
    ap.add_argument("--source", help="export this run folder / checkpoint instead of a fresh one-step run")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args(argv)

    import simmim  # noqa: F401 - before torch (OpenMP wait policy)
    from simmim import runtime

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = Path(args.source) if args.source else make_run(folder, args.model, args.img_size, args.window)
        what = f"{source}" if args.source else f"a one-step pretraining run of {args.model} ({args.img_size} px)"
        print(f"CPU: {runtime.describe()}")
        print(f"source: {what}\n")
        print(f"load average before: {os.getloadavg()[0]:.1f}\n")
        print("| format | process wall clock (s) | process CPU time (s) | export itself, wall (s) |")
        print("|---|---|---|---|")
        for fmt in args.formats.split(","):
            wall, cpu, own = time_export(source, fmt, folder / f"out_{fmt}")
            print(f"| {fmt} | {wall:.1f} | {cpu:.1f} | {own:.1f} |")


if __name__ == "__main__":
    main()
