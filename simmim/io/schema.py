"""Model configs as checkpoints record them: ``{"model": name, constructor arguments}``, completed with the named
config and the constructor's defaults, the geometry that fixes the weights' shapes, and models built from them."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["GEOMETRY", "RUNTIME_ONLY", "full_config", "geometry_of", "describe", "model_name_for", "build_encoder"]

# The constructor arguments that decide the weights' shapes (window and image size only change rebuilt buffers).
GEOMETRY = ("embed_dim", "depths", "num_heads", "patch_size", "in_chans", "mlp_ratio", "qkv_bias")
RUNTIME_ONLY = ("use_checkpoint", "attn_chunk_size")  # memory savers: not part of a model's description


def _constructor_defaults() -> dict[str, Any]:
    from simmim.models.swinv2 import SwinTransformerV2

    params = inspect.signature(SwinTransformerV2.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "kwargs", "norm_layer")}


def full_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Every constructor argument of the model ``cfg`` describes (``model``/``name`` plus overrides; keys that are
    no constructor argument, e.g. ``norm_target``, are left out); tuples as lists. None for an unknown name."""
    from simmim.models.swinv2 import MODEL_CONFIGS

    name = cfg.get("model", cfg.get("name"))
    if name is not None and name not in MODEL_CONFIGS:
        return None
    defaults = _constructor_defaults()
    out = {**defaults, **MODEL_CONFIGS.get(name, {})}
    out.update({k: v for k, v in cfg.items() if k in defaults and v is not None})
    if isinstance(out["img_size"], (list, tuple)) and len(set(out["img_size"])) == 1:
        out["img_size"] = int(out["img_size"][0])
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k not in RUNTIME_ONLY}
    name = name or model_name_for(out)
    return {"model": name, **out} if name else out


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


def model_name_for(geometry: Mapping[str, Any]) -> str | None:
    """The named config with this embed_dim, depths and heads (None for a custom geometry)."""
    from simmim.models.swinv2 import MODEL_CONFIGS

    def key(cfg: Mapping[str, Any]) -> tuple:
        return cfg.get("embed_dim"), tuple(cfg.get("depths", ())), tuple(cfg.get("num_heads", ()))

    return next((name for name, cfg in MODEL_CONFIGS.items() if key(cfg) == key(geometry)), None)


def describe(cfg: Mapping[str, Any]) -> str:
    """One phrase: ``swinv2_nano (embed_dim 32, depths [1, 1, 2, 1], heads [1, 2, 4, 8])``."""
    name = cfg.get("model") or model_name_for(cfg) or "custom SwinV2"
    return f"{name} (embed_dim {cfg['embed_dim']}, depths {list(cfg['depths'])}, heads {list(cfg['num_heads'])})"


def build_encoder(cfg: Mapping[str, Any], **overrides: Any) -> torch.nn.Module:
    """A SwinTransformerV2 from a recorded config (named or custom); ``overrides`` win (e.g. ``num_classes``)."""
    from simmim.models.swinv2 import SwinTransformerV2

    full = full_config({**cfg, **overrides})
    if full is None:
        raise ValueError(f"unknown model {cfg.get('model', cfg.get('name'))!r} in the checkpoint's config")
    full.pop("model", None)
    return SwinTransformerV2(**full)
