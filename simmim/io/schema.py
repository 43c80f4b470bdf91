"""Model configs as checkpoints record them (the registry completes and builds them) and the geometry read from the
weights themselves, for files that record no config."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from simmim.models.registry import RUNTIME_ONLY, build_encoder, model_name_for
from simmim.models.registry import complete_config as full_config

__all__ = ["GEOMETRY", "RUNTIME_ONLY", "full_config", "geometry_of", "describe", "model_name_for", "build_encoder"]

# The constructor arguments that decide the weights' shapes (window and image size only change rebuilt buffers).
GEOMETRY = ("embed_dim", "depths", "num_heads", "patch_size", "in_chans", "mlp_ratio", "qkv_bias")


def geometry_of(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The shape-deciding constructor arguments read from official-layout weights (no config needed)."""
    w = sd["patch_embed.proj.weight"]
    blocks: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = range(len(blocks))
    return {
        "embed_dim": int(w.shape[0]),
        "depths": [len(blocks[i]) for i in stages],
        "num_heads": [int(sd[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in stages],
        "patch_size": int(w.shape[2]),
        "in_chans": int(w.shape[1]),
        "mlp_ratio": sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
        "qkv_bias": "layers.0.blocks.0.attn.q_bias" in sd,
    }


def describe(cfg: Mapping[str, Any]) -> str:
    """One phrase: ``swinv2_nano (embed_dim 32, depths [1, 1, 2, 1], heads [1, 2, 4, 8])``."""
    name = cfg.get("model") or model_name_for(cfg) or "custom SwinV2"
    return f"{name} (embed_dim {cfg['embed_dim']}, depths {list(cfg['depths'])}, heads {list(cfg['num_heads'])})"
