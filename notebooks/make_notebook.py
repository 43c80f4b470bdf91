"""Generate ``explore_reconstructions.ipynb`` from the cells below, so the notebook is code that is linted,
reviewed and tested rather than a JSON file edited by hand.

    python notebooks/make_notebook.py           # (re)write the notebook
    python notebooks/make_notebook.py --check   # exit 1 if the committed notebook is out of date

The notebook is written without outputs; tests/test_notebook.py executes it headlessly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("explore_reconstructions.ipynb")

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# Exploring SimMIM reconstructions

SimMIM hides random square blocks of an image behind a learned mask token and trains a SwinV2 encoder plus a
one-layer linear head to predict the hidden pixels (L1 loss on the masked pixels only). This notebook shows what
a pretrained model predicts, where its loss is, how the task changes with the mask ratio and block size, and two
internals of SwinV2 attention: the learned temperatures and the continuous position bias.

All the logic lives in `simmim.visualize`; the cells only call it. Every figure is also saved to `FIG_DIR`.""",
    ),
    (
        "markdown",
        """## Parameters

`CHECKPOINT = None` pretrains the quickstart model (SwinV2-nano on 32-px Fashion-MNIST) for `PRETRAIN_STEPS`
steps first. The default is short so the notebook runs in CI in a couple of minutes; the model then only
predicts a blurry average garment. Use `PRETRAIN_STEPS = 1000` (the whole quickstart epoch, ~930 steps, about a
minute on 2 CPU cores) or point `CHECKPOINT` at `runs/<recipe>/<name>/checkpoints/last.ckpt` of your own run to see real
reconstructions. `IMAGES` (files or folders) replaces the checkpoint's own validation images. Each parameter can
also come from the environment (`SIMMIM_NOTEBOOK_CHECKPOINT`, `SIMMIM_NOTEBOOK_IMAGES`, `SIMMIM_NOTEBOOK_STEPS`, ...)
or from papermill (`papermill explore_reconstructions.ipynb out.ipynb -p CHECKPOINT runs/.../last.ckpt`).""",
    ),
    (
        "code",
        """import os
from pathlib import Path

from simmim import runtime

runtime.prepare_process()  # passive OpenMP waiting, before torch loads (the next cell)
# Set these here, pass them as papermill parameters (this cell is tagged "parameters"), or in the environment.
CHECKPOINT = os.environ.get("SIMMIM_NOTEBOOK_CHECKPOINT") or None  # a pretraining .ckpt; None: pretrain below
PRETRAIN_STEPS = int(os.environ.get("SIMMIM_NOTEBOOK_STEPS", 25))  # only used when CHECKPOINT is None
# image files / folders (separated by os.pathsep) to reconstruct instead of the checkpoint's validation images
IMAGES = os.environ["SIMMIM_NOTEBOOK_IMAGES"].split(os.pathsep) if "SIMMIM_NOTEBOOK_IMAGES" in os.environ else None
NUM_IMAGES = 8
SEED = 0  # mask seed for the sweeps
FIG_DIR = Path(os.environ.get("SIMMIM_NOTEBOOK_FIGURES", "figures"))
RUN_DIR = Path(os.environ.get("SIMMIM_NOTEBOOK_RUN_DIR", "runs/notebook"))""",
    ),
    (
        "code",
        """%matplotlib inline
from PIL import Image

from simmim import visualize as V
from simmim.data import PretrainDataModule

FIG_DIR.mkdir(parents=True, exist_ok=True)""",
    ),
    (
        "markdown",
        """## A model to look at

Without a checkpoint, run `python -m simmim.pretrain`'s quickstart recipe in-process with fewer steps (no
validation, no intermediate checkpoints). The run folder holds the Lightning checkpoint we load next.""",
    ),
    (
        "code",
        """if CHECKPOINT is None:
    from simmim.cli.pretrain import run
    from simmim.cli.recipes import load_recipe

    out = run(
        load_recipe(
            "pretrain",
            [
                "recipe=quickstart",
                f"run_dir={RUN_DIR}",
                f"schedule.steps={PRETRAIN_STEPS}",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "checkpoint.every_n_steps=0",
                "reconstructions=0",
            ],
        )
    )
    CHECKPOINT = out["checkpoint"]
    print(f"{out['steps']} steps in {out['seconds']:.0f} s, final loss {out['loss']:.3f}")

model, info = V.load_simmim(CHECKPOINT)
mean, std = info.get("mean", V.IMAGENET_MEAN), info.get("std", V.IMAGENET_STD)
mask_patch = info.get("mask_patch_size", 32)
if IMAGES is None:
    datamodule = PretrainDataModule(**{**info["datamodule"], "num_workers": 0})
    images, masks = V.sample_images(datamodule, NUM_IMAGES)  # held-out images and their fixed masks
else:
    images, _ = V.load_images(IMAGES, info["img_size"], mean, std)
    images, masks = images[:NUM_IMAGES], None  # masks drawn from SEED
print(f"{info['img_size']} px images: {len(images)}; norm_target={model.norm_target}; mask blocks {mask_patch} px")""",
    ),
    (
        "markdown",
        """## Reconstructions

Columns are images; rows are the **original**, the **masked** input the encoder sees (grey = mask token),
the raw **prediction** of the linear head on every pixel (visible ones too; the loss ignores those), and the
prediction **pasted** into the masked blocks of the original. The titles give each image's masked L1, the
training loss. With `NORM_TARGET` the head predicts locally normalised pixels; they are shown after undoing
that normalisation with the image's own local mean and std (the title says so).""",
    ),
    (
        "code",
        """recs = V.reconstruct(model, images, masks, mean, std, mask_patch, seed=SEED)
grid = V.make_grid(recs, title=Path(CHECKPOINT).name)
Image.fromarray(grid).save(FIG_DIR / "reconstructions.png")
Image.fromarray(grid)""",
    ),
    (
        "markdown",
        """## Where the loss is

The L1 error per pixel, averaged over each masked block, drawn over the pasted reconstruction (visible blocks
have no loss). Blocks on edges and textures are usually the hardest; flat background is easy.""",
    ),
    (
        "code",
        """V.plot_loss_heatmap(recs, mask_patch, FIG_DIR / "loss_heatmap.png")""",
    ),
    (
        "markdown",
        """## Mask ratio and mask block size

The same images with masks drawn from one seed at several settings. More masking or larger blocks leave less
nearby context, so the loss rises; the paper found 32-px blocks at ratio 0.6 (192-px images) a good pretext
task. The model was trained at one setting, so the others also show how it generalises.""",
    ),
    (
        "code",
        """settings = [(0.3, mask_patch), (0.6, mask_patch), (0.8, mask_patch)]
sizes = (mask_patch // 2, mask_patch * 2)
settings += [(0.6, p) for p in sizes if p % model.patch_size == 0 and info["img_size"] % p == 0]
V.plot_mask_sweep(model, images[:4], settings, FIG_DIR / "mask_sweep.png", mean, std, seed=SEED)""",
    ),
    (
        "markdown",
        """## Attention temperatures

SwinV2 replaces dot-product attention by cosine similarity divided by a learned temperature per head and block:
`exp(min(logit_scale, log 100))`, initialised at 10. Heads that move away from 10 are sharpening (higher) or
softening (lower) their attention.""",
    ),
    (
        "code",
        """V.plot_temperatures(model, FIG_DIR / "temperatures.png")""",
    ),
    (
        "markdown",
        """## Position bias

The log-spaced continuous position bias: a small MLP (`cpb_mlp`) maps each relative offset (dy, dx) between a
query and a key inside a window to a bias per head, squashed to `16 * sigmoid(.)`. Each image is one head's
bias over all offsets; the centre pixel is a token attending to itself. Stages whose feature map is smaller
than the window attend globally over fewer offsets.""",
    ),
    (
        "code",
        """V.plot_position_bias(model, FIG_DIR / "position_bias.png")""",
    ),
    (
        "code",
        """saved = sorted(p.name for p in FIG_DIR.glob("*.png"))
print("figures saved in", FIG_DIR, ":", ", ".join(saved))""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nb.cells[2].metadata["tags"] = ["parameters"]  # papermill-style parameter cell
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the notebook differs from the generator")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not NOTEBOOK.is_file() or NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is out of date: run python notebooks/make_notebook.py", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
