"""Seeing what SimMIM learns: reconstruction grids, per-patch loss maps, attention temperatures and position biases,
a Lightning callback that logs grids during pretraining, and ``python -m simmim.visualize``.

``reconstruct`` runs the model (:mod:`.reconstruct`), ``make_grid`` draws the picture (:mod:`.grid`), ``plot_*`` are
the notebook's figures (:mod:`.figures`), ``load_simmim`` / ``load_images`` / ``sample_images`` find what to look at
(:mod:`.inputs`), :class:`ReconstructionGridCallback` draws during training (:mod:`.callback`).
"""

import importlib
from typing import Any

# what lives where: imported on first use, so that `python -m simmim.visualize` sets up the process before torch loads
_WHERE = {
    "CAPTION_H": "simmim.visualize.grid",
    "LABEL_W": "simmim.visualize.grid",
    "MASK_GREY": "simmim.visualize.reconstruction",
    "PAD": "simmim.visualize.grid",
    "ROWS": "simmim.visualize.reconstruction",
    "TITLE_H": "simmim.visualize.grid",
    "IMAGENET_MEAN": "simmim.data.transforms",
    "IMAGENET_STD": "simmim.data.transforms",
    "ReconstructionGridCallback": "simmim.visualize.callback",
    "Reconstructions": "simmim.visualize.reconstruction",
    "VisualizeError": "simmim.visualize.inputs",
    "attention_temperatures": "simmim.visualize.figures",
    "denormalize": "simmim.visualize.reconstruction",
    "fixed_masks": "simmim.visualize.reconstruction",
    "grid_zoom": "simmim.visualize.grid",
    "input_normalisation": "simmim.visualize.inputs",
    "load_images": "simmim.visualize.inputs",
    "load_simmim": "simmim.visualize.inputs",
    "main": "simmim.visualize.cli",
    "make_grid": "simmim.visualize.grid",
    "patch_loss_map": "simmim.visualize.reconstruction",
    "plot_loss_heatmap": "simmim.visualize.figures",
    "plot_mask_sweep": "simmim.visualize.figures",
    "plot_position_bias": "simmim.visualize.figures",
    "plot_temperatures": "simmim.visualize.figures",
    "position_bias_maps": "simmim.visualize.figures",
    "reconstruct": "simmim.visualize.reconstruction",
    "sample_images": "simmim.visualize.inputs",
    "save_confusion_matrix": "simmim.visualize.figures",
    "save_reconstruction_grid": "simmim.visualize.grid",
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Reconstructions",
    "ReconstructionGridCallback",
    "VisualizeError",
    "attention_temperatures",
    "denormalize",
    "fixed_masks",
    "grid_zoom",
    "input_normalisation",
    "load_images",
    "load_simmim",
    "main",
    "make_grid",
    "patch_loss_map",
    "plot_loss_heatmap",
    "plot_mask_sweep",
    "plot_position_bias",
    "plot_temperatures",
    "position_bias_maps",
    "reconstruct",
    "sample_images",
    "save_confusion_matrix",
    "save_reconstruction_grid",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'simmim.visualize' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
