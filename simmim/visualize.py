"""Seeing what SimMIM learns: reconstruction grids, per-patch loss maps, attention temperatures and position
biases, a Lightning callback that logs grids during pretraining, and ``python -m simmim.visualize``.

Predictions live in the model's target space: ImageNet-normalised pixels, or, with ``NORM_TARGET``, pixels
normalised by the mean/std of their 47-px neighbourhood (official SwinV2 SimMIM config). To make them viewable
we undo the local normalisation with the image's own local statistics, then undo the ImageNet normalisation.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PosixPath, WindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from simmim.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    BadImageError,
    BadImageWarning,
    eval_transform,
    open_image,
)
from simmim.data.images import is_image_file
from simmim.masking import MaskGenerator
from simmim.models.attention import WindowAttention
from simmim.models.simmim import SimMIM
from simmim.models.targets import masked_l1, norm_targets, upsample_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Reconstructions",
    "ReconstructionGridCallback",
    "denormalize",
    "fixed_masks",
    "reconstruct",
    "make_grid",
    "save_reconstruction_grid",
    "patch_loss_map",
    "attention_temperatures",
    "position_bias_maps",
    "plot_loss_heatmap",
    "plot_mask_sweep",
    "plot_temperatures",
    "plot_position_bias",
    "VisualizeError",
    "sample_images",
    "input_normalisation",
    "load_simmim",
    "load_images",
    "main",
]

ROWS = ("original", "masked", "prediction", "pasted")
MASK_GREY = 0.5  # masked pixels in the "masked" row


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of ``(x - mean) / std`` per channel on [B, 3, H, W], clipped to the viewable range [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0.0, 1.0)


def fixed_masks(
    n: int,
    img_size: int,
    model_patch_size: int = 4,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> torch.Tensor:
    """``n`` SimMIM masks [n, img/p, img/p] (1 = masked) drawn from one generator seeded with ``seed``."""
    gen = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))


@dataclass
class Reconstructions:
    """Viewable images [B, 3, H, W] in [0, 1], the pixel mask, and losses in the model's target space."""

    original: torch.Tensor
    masked: torch.Tensor
    prediction: torch.Tensor  # the model's output everywhere, visible pixels included
    pasted: torch.Tensor  # prediction on masked pixels, original on visible ones
    pixel_mask: torch.Tensor  # [B, 1, H, W], 1 = masked
    pixel_l1: torch.Tensor  # [B, H, W] |target - prediction| averaged over channels
    loss: torch.Tensor  # [B] masked L1 per image, as in training
    norm_target: bool
    norm_target_patch_size: int

    @property
    def target_note(self) -> str:
        """One line saying which space the prediction was shown in."""
        if self.norm_target:
            return f"NORM_TARGET: prediction un-normalised with local mean/std ({self.norm_target_patch_size} px)"
        return "target: the normalised input pixels"


@torch.no_grad()
def reconstruct(
    model: SimMIM,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> Reconstructions:
    """Run ``model`` on normalised ``images`` [B, 3, H, W] with ``masks`` [B, H/p, W/p] (generated from
    ``seed``, ``mask_patch_size``, ``mask_ratio`` when None) and return viewable results.

    Runs in eval mode without autocast (the caller's mode is restored), so it is safe inside a bf16 run.
    """
    if images.ndim != 4 or images.shape[1] != model.in_chans:
        raise ValueError(f"images must be [B, {model.in_chans}, H, W], got {tuple(images.shape)}")
    if masks is None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"masks can only be generated for square images, got {tuple(images.shape[2:])}")
        masks = fixed_masks(len(images), images.shape[2], model.patch_size, mask_patch_size, mask_ratio, seed)
    param = next(model.parameters())
    device = param.device
    x = images.to(device, torch.float32)
    masks = masks.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            rec = model.reconstruct(x.to(param.dtype), masks).float()
    finally:
        model.train(was_training)
    pixel_mask = upsample_mask(masks, model.patch_size).float()[..., : x.shape[2], : x.shape[3]]
    if model.norm_target:
        target, local_mean, local_std = norm_targets(x, model.norm_target_patch_size, return_stats=True)
        rec_input = rec * local_std + local_mean  # back to the ImageNet-normalised input space
    else:
        target, rec_input = x, rec
    original = denormalize(x, mean, std)
    prediction = denormalize(rec_input, mean, std)
    return Reconstructions(
        original=original.cpu(),
        masked=(original * (1 - pixel_mask) + MASK_GREY * pixel_mask).cpu(),
        prediction=prediction.cpu(),
        pasted=torch.where(pixel_mask.bool(), prediction, original).cpu(),
        pixel_mask=pixel_mask.cpu(),
        pixel_l1=(target - rec).abs().mean(1).cpu(),
        loss=masked_l1(target, rec, pixel_mask, per_sample=True).cpu(),
        norm_target=model.norm_target,
        norm_target_patch_size=model.norm_target_patch_size,
    )


def patch_loss_map(recs: Reconstructions, patch_size: int) -> torch.Tensor:
    """Mean per-pixel L1 in each ``patch_size`` square over masked squares, NaN over visible ones:
    [B, H/patch, W/patch]. Use the mask patch size to get one value per masked block."""
    h, w = recs.pixel_l1.shape[1:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")
    loss = F.avg_pool2d(recs.pixel_l1.unsqueeze(1), patch_size).squeeze(1)
    masked = F.avg_pool2d(recs.pixel_mask, patch_size).squeeze(1) > 0.5
    return torch.where(masked, loss, torch.full_like(loss, float("nan")))


# ---- grids (PIL: exact pixels, no resampling, cheap enough for a training callback) ---------------------
LABEL_W = 70  # row labels on the left
TITLE_H = 28  # two lines of title
CAPTION_H = 14  # per-image loss above each column
PAD = 2


def _font(size: int = 11) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _to_uint8(x: torch.Tensor, zoom: int) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H*zoom, W*zoom, 3] uint8, nearest-neighbour so pixels stay exact."""
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return arr.repeat(zoom, axis=0).repeat(zoom, axis=1)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` px (the grid's size never depends on its text)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid_zoom(img_size: int, min_tile: int = 96) -> int:
    """Integer upscaling so small images (e.g. 32-px Fashion-MNIST) stay readable: ceil(min_tile / size)."""
    return max(1, math.ceil(min_tile / img_size))


def make_grid(recs: Reconstructions, title: str = "", min_tile: int = 96) -> np.ndarray:
    """A uint8 [H, W, 3] picture: one column per image, rows original / masked / prediction / pasted.

    Layout: a two-line title band (``title`` and the mean masked L1; then which target space), a caption with
    each image's masked L1, row labels on the left. With tiles of ``th x tw`` = image size times
    :func:`grid_zoom`, the size is ``(TITLE_H + CAPTION_H + 4 * (th + PAD) + PAD, LABEL_W + B * (tw + PAD) + PAD)``.
    """
    from PIL import Image, ImageDraw

    b, _, h, w = recs.original.shape
    zoom = grid_zoom(max(h, w), min_tile)
    th, tw = h * zoom, w * zoom
    height = TITLE_H + CAPTION_H + len(ROWS) * (th + PAD) + PAD
    width = LABEL_W + b * (tw + PAD) + PAD
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(ROWS):
        y = TITLE_H + CAPTION_H + PAD + r * (th + PAD)
        for i, img in enumerate(getattr(recs, row)):
            x = LABEL_W + PAD + i * (tw + PAD)
            canvas[y : y + th, x : x + tw] = _to_uint8(img, zoom)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    font = _font()
    loss = f"mean masked L1={recs.loss.mean():.4f}"
    # loss first, so a title too long for a narrow grid loses its end, not the number
    head = f"{loss}  |  {title}" if title else loss
    draw.text((4, 1), _fit(draw, head, font, width - 8), fill=(0, 0, 0), font=font)
    draw.text((4, 14), _fit(draw, recs.target_note, font, width - 8), fill=(90, 90, 90), font=font)
    for i, loss in enumerate(recs.loss):
        draw.text((LABEL_W + PAD + i * (tw + PAD) + 2, TITLE_H), f"L1={loss:.3f}", fill=(0, 0, 0), font=font)
    for r, row in enumerate(ROWS):
        y = TITLE_H + CAPTION_H + PAD + r * (th + PAD) + th // 2 - 6
        draw.text((4, y), row, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def save_reconstruction_grid(
    model: SimMIM,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    path: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    title: str = "",
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    seed: int = 0,
) -> np.ndarray:
    """Reconstruct ``images`` (masks generated from ``seed`` when None), save the grid PNG at ``path`` and
    return it as uint8 [H, W, 3]."""
    from PIL import Image

    recs = reconstruct(model, images, masks, mean, std, mask_patch_size, mask_ratio, seed)
    grid = make_grid(recs, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


# ---- attention internals --------------------------------------------------------------------------------
def _attention_modules(model: nn.Module) -> list[tuple[str, WindowAttention]]:
    """(``"stage s block j"``, module) for every window attention, in depth order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, WindowAttention):
            parts = name.split(".")
            i = parts.index("layers")
            out.append((f"stage {parts[i + 1]} block {parts[i + 3]}", m))
    return out


@torch.no_grad()
def attention_temperatures(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per block, the per-head cosine-attention temperature exp(min(logit_scale, log 100)) [nH] (init: 10)."""
    return {name: attn.temperature().float().flatten().cpu() for name, attn in _attention_modules(model)}


@torch.no_grad()
def position_bias_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per block, 16 * sigmoid(cpb_mlp(relative coords)) as [nH, 2Wh-1, 2Ww-1] images indexed by the
    (dy, dx) offset between query and key; the centre pixel is offset (0, 0). Values lie in (0, 16)."""
    return {name: attn.position_bias_table().float().cpu() for name, attn in _attention_modules(model)}


# ---- matplotlib figures for the notebook ----------------------------------------------------------------
def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def plot_loss_heatmap(recs: Reconstructions, patch_size: int, path: str | Path | None = None) -> Figure:
    """Each image with its per-patch masked L1 (:func:`patch_loss_map`) as a heat map over the masked blocks."""
    maps = patch_loss_map(recs, patch_size)
    vmax = float(np.nanmax(maps.numpy())) if torch.isfinite(maps).any() else 1.0
    b = len(maps)
    fig, axes = _figure(1, b, (2.2, 2.4))
    h, w = recs.original.shape[2:]
    for i, ax in enumerate(axes[0]):
        ax.imshow(_hwc(recs.pasted[i]), extent=(0, w, h, 0))
        im = ax.imshow(maps[i].numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, extent=(0, w, h, 0))
        ax.set_title(f"masked L1 {recs.loss[i]:.3f}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"L1 per {patch_size}-px block")
    fig.suptitle(f"Where the loss is: mean |target - prediction| per masked block\n{recs.target_note}", fontsize=9)
    return _save(fig, path)


def plot_mask_sweep(
    model: SimMIM,
    images: torch.Tensor,
    settings: Sequence[tuple[float, int]],
    path: str | Path | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> Figure:
    """One row per (mask_ratio, mask_patch_size): each image's masked input and pasted reconstruction."""
    b = len(images)
    fig, axes = _figure(len(settings), 2 * b, (1.3, 1.5))
    for r, (ratio, patch) in enumerate(settings):
        recs = reconstruct(model, images, None, mean, std, patch, ratio, seed)
        for i in range(b):
            axes[r, 2 * i].imshow(_hwc(recs.masked[i]))
            axes[r, 2 * i + 1].imshow(_hwc(recs.pasted[i]))
        axes[r, 0].set_ylabel(f"ratio {ratio}\npatch {patch}px\nL1 {recs.loss.mean():.3f}", fontsize=8)
    for i in range(b):
        axes[0, 2 * i].set_title("masked", fontsize=8)
        axes[0, 2 * i + 1].set_title("pasted", fontsize=8)
    fig.suptitle("Reconstructions as the mask ratio and mask patch size change (same seed)", fontsize=9)
    return _save(fig, path)


def plot_temperatures(model: nn.Module, path: str | Path | None = None) -> Figure:
    """Every head's attention temperature (one dot per head, spread within its block; the line joins the block
    means). The y axis fits the values, so small moves away from the initial 10 (dashed) stay visible."""
    from matplotlib.figure import Figure

    temps = attention_temperatures(model)
    fig = Figure(figsize=(max(4.0, 0.9 * len(temps) + 1), 3.0), layout="constrained")
    ax = fig.subplots()
    for k, t in enumerate(temps.values()):
        offsets = (np.arange(len(t)) - (len(t) - 1) / 2) * (0.6 / max(len(t), 1))
        ax.plot(k + offsets, t.numpy(), "o", color="tab:blue", markersize=4)
    ax.plot(range(len(temps)), [float(t.mean()) for t in temps.values()], "-", color="tab:orange", label="block mean")
    ax.axhline(10.0, color="grey", linestyle="--", linewidth=1, label="init 10")
    ax.set_xticks(range(len(temps)), [n.replace(" block ", "\nblock ") for n in temps], fontsize=7)
    ax.set_ylabel("temperature exp(logit_scale)")
    ax.legend(fontsize=7)
    ax.set_title("Cosine-attention temperature per head (dots) and block (max 100)", fontsize=9)
    return _save(fig, path)


def plot_position_bias(
    model: nn.Module, path: str | Path | None = None, max_blocks: int = 4, max_heads: int = 4
) -> Figure:
    """16 * sigmoid(cpb_mlp) over (query - key) offsets for the first ``max_heads`` heads of up to ``max_blocks``
    blocks spread over the depth (blocks whose window is a single token have no offsets to show)."""
    maps = {name: m for name, m in position_bias_maps(model).items() if m.shape[1] * m.shape[2] > 1}
    if not maps:
        raise ValueError("every attention window of this model is a single token: no position bias to show")
    names = list(maps)
    pick = sorted(
        {names[round(i)] for i in np.linspace(0, len(names) - 1, min(max_blocks, len(names)))}, key=names.index
    )
    ncols = min(max_heads, max(len(maps[n]) for n in pick))
    fig, axes = _figure(len(pick), ncols, (1.9, 1.9))
    for r, name in enumerate(pick):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(maps[name]):
                ax.set_axis_off()
                continue
            m = maps[name][c]
            ry, rx = (m.shape[0] - 1) // 2, (m.shape[1] - 1) // 2
            im = ax.imshow(m.numpy(), cmap="viridis", extent=(-rx - 0.5, rx + 0.5, ry + 0.5, -ry - 0.5))
            ax.set_xticks([-rx, 0, rx])
            ax.set_yticks([-ry, 0, ry])
            ax.tick_params(labelsize=6)
            ax.set_title(f"{name}, head {c}", fontsize=7)
            fig.colorbar(im, ax=ax, shrink=0.7).ax.tick_params(labelsize=6)
    fig.suptitle("Position bias 16*sigmoid(cpb_mlp) by offset (dy, dx) = query - key; centre: same token", fontsize=9)
    return _save(fig, path)


# ---- inputs: images from a datamodule, checkpoints, image files -------------------------------------------
def input_normalisation(datamodule: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a datamodule's input normalisation (its hyper-parameters), else ImageNet's."""
    hp = getattr(datamodule, "hparams", {})
    return tuple(hp.get("mean") or IMAGENET_MEAN), tuple(hp.get("std") or IMAGENET_STD)


def sample_images(datamodule: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` validation samples of ``datamodule`` (training samples when it has no validation set):
    images [n, 3, H, W] and their masks when the samples carry them (else None).

    Samples are read from the dataset by index, so the training sampler's state (exact resume) is left alone.
    """
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from torch.utils.data import default_collate

    try:
        loader = datamodule.val_dataloader()
    except MisconfigurationException:  # the datamodule defines no validation loader
        loader = []
    if not loader:
        loader = datamodule.train_dataloader()
    dataset = loader.dataset
    if len(dataset) == 0:
        raise ValueError(f"{type(datamodule).__name__} has no images for the reconstruction grid")
    batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
    return batch["image"], batch.get("mask")


# ---- Lightning callback -----------------------------------------------------------------------------------
class ReconstructionGridCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the start and end of training), reconstruct a FIXED set
    of images with FIXED masks, save ``reconstructions/step_XXXXXX.png`` in the run folder and log the grid
    to the loggers (TensorBoard ``add_image``, or any logger with ``log_image``). Rank 0 only.

    ``images_or_datamodule_val``: a normalised image tensor [N, 3, H, W], a datamodule, or None for the
    trainer's datamodule; from a datamodule the first ``num_images`` validation images (training images when
    there is no validation set) are taken once, with their masks when the batches carry them. Otherwise masks
    are drawn once from ``seed`` with ``mask_patch_size`` / ``mask_ratio``. ``mean`` / ``std`` (of the input
    normalisation) default to the datamodule's, else ImageNet's. The pretraining module must expose its
    :class:`SimMIM` as ``.model``.
    """

    def __init__(
        self,
        images_or_datamodule_val: torch.Tensor | Any = None,
        every_n_steps: int = 500,
        num_images: int = 8,
        seed: int = 0,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dirpath: str | Path | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.source = images_or_datamodule_val
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.mean, self.std = mean, std
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self._last_step = -1

    def _collect(self, trainer: Any, model: SimMIM) -> None:
        source = trainer.datamodule if self.source is None else self.source
        if source is None:
            raise ValueError(
                "ReconstructionGridCallback needs images: pass a tensor or a datamodule, or fit with a datamodule"
            )
        if isinstance(source, torch.Tensor):
            images, masks = source[: self.num_images], None
        else:
            images, masks = sample_images(source, self.num_images)
        mean, std = input_normalisation(None if isinstance(source, torch.Tensor) else source)
        self.mean, self.std = tuple(self.mean or mean), tuple(self.std or std)
        self.images = images.detach().float().cpu()
        if masks is None:
            size = self.images.shape[-1]
            masks = fixed_masks(
                len(self.images), size, model.patch_size, self.mask_patch_size, self.mask_ratio, self.seed
            )
        self.masks = masks.cpu()

    def _folder(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"

    def log_grid(self, trainer: Any, pl_module: Any) -> None:
        """Write the grid for the current global step (once per step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        model: SimMIM = pl_module.model
        if self.images is None:
            self._collect(trainer, model)
        path = self._folder(trainer) / f"step_{step:06d}.png"
        grid = save_reconstruction_grid(model, self.images, self.masks, path, self.mean, self.std, title=f"step {step}")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("reconstructions", grid, step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # e.g. W&B
                logger.log_image(key="reconstructions", images=[grid], step=step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.log_grid(trainer, pl_module)


# ---- command line -----------------------------------------------------------------------------------------
class VisualizeError(ValueError):
    """A checkpoint or image the CLI cannot use; the message names the file and what to do."""


def load_simmim(path: str | Path) -> tuple[SimMIM, dict[str, Any]]:
    """A SimMIM model (eval mode, CPU) from a pretraining Lightning checkpoint, or from any torch file holding
    ``{"state_dict": SimMIM state dict, "model_config": {"model": name, ...}}``; also returns the data settings
    stored with it (``img_size``, ``mask_patch_size``, ``mask_ratio``, ``mean``, ``std``, and ``datamodule``: all
    the datamodule's hyper-parameters, to rebuild it) when it has them."""
    from simmim.models.simmim import build_simmim

    path = Path(path)
    if not path.is_file():
        raise VisualizeError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        raise VisualizeError(
            f"{path} is an exported encoder: it has no pixel decoder, so it cannot reconstruct. "
            "Pass the pretraining checkpoint instead (runs/<recipe>/<name>/checkpoints/last.ckpt)"
        )
    if not zipfile.is_zipfile(path):
        raise VisualizeError(f"{path} is not a PyTorch checkpoint (torch.save / Lightning .ckpt file)")
    try:
        # safe loading; paths are allowed since a datamodule's hyper-parameters may hold its root as a Path
        with torch.serialization.safe_globals([PosixPath, WindowsPath]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a checkpoint we can read
        raise VisualizeError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    obj = obj if isinstance(obj, dict) else {}
    hp = obj.get("hyper_parameters", obj)
    cfg, sd = hp.get("model_config"), obj.get("state_dict")
    if not isinstance(cfg, dict) or "model" not in cfg or not isinstance(sd, dict):
        raise VisualizeError(
            f"{path} is not a SimMIM checkpoint: expected a pretraining .ckpt (python -m simmim.pretrain) or a "
            "file with 'state_dict' and 'model_config' (with its 'model' name)"
        )
    cfg = dict(cfg)
    name = cfg.pop("model")
    norm_target = hp.get("norm_target", cfg.pop("norm_target", False))
    nt_patch = hp.get("norm_target_patch_size", cfg.pop("norm_target_patch_size", 47))
    try:
        model = build_simmim(name, norm_target=norm_target, norm_target_patch_size=nt_patch, **cfg)
    except (TypeError, ValueError) as e:
        raise VisualizeError(f"{path}: cannot build the model from its model_config {cfg}: {e}") from e
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        what = "; ".join(
            f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise VisualizeError(f"{path}: its weights do not fit a SimMIM {name}: {what}")
    data = dict(obj.get("datamodule_hyper_parameters") or {})
    info: dict[str, Any] = {
        k: data[k] for k in ("img_size", "mask_patch_size", "mask_ratio", "mean", "std") if k in data
    }
    info.setdefault("img_size", cfg.get("img_size"))
    if data:
        info["datamodule"] = data
    return model.eval(), info


def load_images(
    paths: Sequence[str | Path],
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_images: int | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Image files, or folders searched recursively for images, resized (shorter side) and centre-cropped to
    ``img_size`` and normalised: ([N, 3, img_size, img_size], the files in order), at most ``max_images``.

    Unreadable files are skipped with a ``BadImageWarning``, as pretraining does; ``VisualizeError`` only when
    no readable image is left."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name))
            if not found:
                raise VisualizeError(f"folder {p} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise VisualizeError(f"image {p} does not exist")
    transform = eval_transform(img_size, resize_ratio=1.0, mean=mean, std=std)
    images: list[torch.Tensor] = []
    used: list[Path] = []
    bad: list[BadImageError] = []
    for f in files:
        if max_images is not None and len(images) >= max_images:
            break  # read no more than shown: a large folder stays quick
        try:
            image = open_image(f)
        except BadImageError as e:
            bad.append(e)
            continue
        images.append(transform(image=np.asarray(image))["image"])
        used.append(f)
    reasons = [(e.path, " ".join(e.reason.split())) for e in bad]  # one line each: the CLI prints lines
    if not images:
        if len(bad) == 1:
            raise VisualizeError(f"cannot read image {reasons[0][0]}: {reasons[0][1]}")
        few = "; ".join(f"{path} ({reason})" for path, reason in reasons[:3]) + (" ..." if len(bad) > 3 else "")
        raise VisualizeError(
            f"cannot read images: none of the {len(bad)} image files is readable ({few}): fix or replace them"
        )
    for path, reason in reasons:
        warnings.warn(f"skipping unreadable image {path}: {reason}", BadImageWarning, stacklevel=2)
    return torch.stack(images), used


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmim.visualize CHECKPOINT IMAGES... --out grid.png``: reconstruction grid of the images."""
    parser = argparse.ArgumentParser(
        prog="python -m simmim.visualize",
        description="Save a grid original / masked / prediction / pasted for images under a SimMIM checkpoint.",
    )
    parser.add_argument("checkpoint", help="pretraining checkpoint (runs/<recipe>/<name>/checkpoints/last.ckpt)")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", default="reconstructions.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, help="fraction of blocks masked (default: the checkpoint's)")
    parser.add_argument("--mask-patch-size", type=int, help="masked block side in px (default: the checkpoint's)")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="mask seed (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=16, help="at most this many images (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for flag, value in (("--max-images", args.max_images), ("--img-size", args.img_size)):
            if value is not None and value < 1:
                raise VisualizeError(f"{flag} must be >= 1, got {value}")
        model, info = load_simmim(args.checkpoint)
        img_size, mask_patch_size, mask_ratio = _geometry(args, info, model.patch_size)
        mean, std = info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD)
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always", BadImageWarning)
            try:
                images, files = load_images(args.images, img_size, mean, std, args.max_images)
            finally:  # one "warning:" line per skipped file, like the "error:" line, not a warnings traceback
                for w in skipped:
                    print(f"warning: {w.message}", file=sys.stderr)
        names = ", ".join(f.name for f in files)
        save_reconstruction_grid(
            model,
            images,
            None,
            args.out,
            mean,
            std,
            title=f"{Path(args.checkpoint).name}: {names}",
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            seed=args.seed,
        )
    except ValueError as e:  # VisualizeError, shape errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(images)} images, {img_size} px)")
    return 0


def _geometry(args: argparse.Namespace, info: dict[str, Any], patch_size: int) -> tuple[int, int, float]:
    """(img_size, mask_patch_size, mask_ratio) from the flags, else the checkpoint; errors name the flags
    (MaskGenerator's own would name its arguments, which the user never typed)."""

    def shown(flag: str, value: Any) -> str:
        given = getattr(args, flag[2:].replace("-", "_")) is not None
        return f"{flag} {value}" + ("" if given else " (the checkpoint's)")

    img_size = args.img_size if args.img_size is not None else info.get("img_size") or 192
    mask_patch_size = args.mask_patch_size if args.mask_patch_size is not None else info.get("mask_patch_size", 32)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else info.get("mask_ratio", 0.6)
    if mask_patch_size < 1:
        raise VisualizeError(f"{shown('--mask-patch-size', mask_patch_size)} must be >= 1")
    if not 0.0 < mask_ratio < 1.0:
        raise VisualizeError(f"{shown('--mask-ratio', mask_ratio)} must lie strictly between 0 and 1, e.g. 0.6")
    if img_size % mask_patch_size:
        raise VisualizeError(
            f"{shown('--img-size', img_size)} is not divisible by {shown('--mask-patch-size', mask_patch_size)}: "
            f"pass an --img-size that is a multiple of {mask_patch_size}, or another --mask-patch-size"
        )
    if mask_patch_size % patch_size:
        raise VisualizeError(
            f"{shown('--mask-patch-size', mask_patch_size)} is not divisible by the model's patch size "
            f"{patch_size}: pass a --mask-patch-size that is a multiple of {patch_size}"
        )
    return img_size, mask_patch_size, mask_ratio


if __name__ == "__main__":
    sys.exit(main())
