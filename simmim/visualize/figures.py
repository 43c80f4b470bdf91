"""Matplotlib figures for the notebook and the run folder: where the loss is, mask sweeps, the attention
temperatures and position biases the model learned, the confusion matrix of a fine-tuning run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from simmim.models.attention import WindowAttention
from simmim.models.simmim import SimMIM
from simmim.visualize.reconstruction import Reconstructions, patch_loss_map, reconstruct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "attention_temperatures",
    "position_bias_maps",
    "plot_loss_heatmap",
    "plot_mask_sweep",
    "plot_temperatures",
    "plot_position_bias",
    "save_confusion_matrix",
]


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


def save_confusion_matrix(matrix: list[list[int]], names: Sequence[str], path: str | Path) -> Path:
    """The test confusion matrix as a PNG, class names on both axes (counts written in for up to 20 classes)."""
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="test confusion matrix")
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=6)
    fig.savefig(path, dpi=120)
    return Path(path)
