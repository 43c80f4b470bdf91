"""Named SwinV2 configurations, the encoder config that rebuilds a model, the effective window of each stage, and
building / compiling models from them (timm style: ``create_model("swinv2_base", img_size=192, window_size=12)``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from simmim import runtime
from simmim.models.layers import clip_window
from simmim.models.swinv2 import SwinTransformerV2

__all__ = [
    "MODEL_CONFIGS",
    "RUNTIME_ONLY",
    "build_encoder",
    "check_model_name",
    "compile_model",
    "complete_config",
    "config_stage_windows",
    "create_model",
    "encoder_config",
    "model_name_for",
    "stage_windows",
]

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # Paper sizes (Table 1 / official configs); H and G as in the paper's section 4.
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swinv2_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    "swinv2_giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128)),
    # Small models that train in minutes on a CPU at 32-96 px.
    "swinv2_micro": dict(embed_dim=48, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16), window_size=4),
    "swinv2_nano": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4),
}
RUNTIME_ONLY = ("use_checkpoint", "attn_chunk_size")  # constructor options that change memory, not weights


def check_model_name(name: str) -> None:
    """ValueError naming the known configurations unless ``name`` is one."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")


def create_model(name: str, **overrides: Any) -> SwinTransformerV2:
    """Build a named configuration, e.g. ``create_model("swinv2_base", img_size=192, window_size=12)``."""
    check_model_name(name)
    return SwinTransformerV2(**{**MODEL_CONFIGS[name], **overrides})


def encoder_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full encoder config ``{"model": name, embed_dim, depths, ..., overrides}`` that rebuilds the model with
    ``create_model(**config)`` (and is saved with checkpoints: lists, not tuples); runtime-only options
    (activation checkpointing, attention chunks) and None overrides are left out."""
    check_model_name(name)
    cfg = {"model": name, **MODEL_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k not in RUNTIME_ONLY}


def complete_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Every constructor argument of the model a recorded ``cfg`` describes (``model``/``name`` and overrides,
    completed with the named config and the constructor's defaults; keys that are no constructor argument, e.g.
    ``norm_target``, left out; tuples as lists); None for an unknown name."""
    name = cfg.get("model", cfg.get("name"))
    if name is not None and name not in MODEL_CONFIGS:
        return None
    params = inspect.signature(SwinTransformerV2.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("self", "kwargs", "norm_layer")}
    out = {**defaults, **MODEL_CONFIGS.get(name, {})}
    out.update({k: v for k, v in cfg.items() if k in defaults and v is not None})
    if isinstance(out["img_size"], (list, tuple)) and len(set(out["img_size"])) == 1:
        out["img_size"] = int(out["img_size"][0])
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k not in RUNTIME_ONLY}
    name = name or model_name_for(out)
    return {"model": name, **out} if name else out


def model_name_for(geometry: Mapping[str, Any]) -> str | None:
    """The named config with this embed_dim, depths and heads (None for a custom geometry)."""

    def key(cfg: Mapping[str, Any]) -> tuple:
        return cfg.get("embed_dim"), tuple(cfg.get("depths", ())), tuple(cfg.get("num_heads", ()))

    return next((name for name, cfg in MODEL_CONFIGS.items() if key(cfg) == key(geometry)), None)


def build_encoder(cfg: Mapping[str, Any], **overrides: Any) -> SwinTransformerV2:
    """A SwinTransformerV2 from a recorded config (named or custom); ``overrides`` win (e.g. ``num_classes``)."""
    full = complete_config({**cfg, **overrides})
    if full is None:
        raise ValueError(f"unknown model {cfg.get('model', cfg.get('name'))!r} in the checkpoint's config")
    full.pop("model", None)
    return SwinTransformerV2(**full)


def stage_windows(
    img_size: int | Sequence[int], window_size: int, patch_size: int = 4, num_stages: int = 4
) -> tuple[int, ...]:
    """The window each stage attends with at ``img_size`` (square images and windows): the configured one, or the
    whole stage where it is no larger (:func:`~simmim.models.layers.clip_window`, the official rule)."""
    img = img_size if isinstance(img_size, int) else int(img_size[0])
    grid = math.ceil(img / patch_size)
    out = []
    for i in range(num_stages):
        res = math.ceil(grid / 2**i)
        out.append(clip_window((res, res), (window_size, window_size))[0][0])
    return tuple(out)


def config_stage_windows(config: Mapping[str, Any]) -> tuple[int, ...] | None:
    """:func:`stage_windows` of a saved encoder config (a name and overrides, or the full geometry); None when it
    lacks the image size, window or depths."""
    base = dict(MODEL_CONFIGS.get(str(config.get("model", config.get("name", ""))), {}))
    base.update({k: v for k, v in config.items() if v is not None})
    if "img_size" not in base or "window_size" not in base or "depths" not in base:
        return None
    return stage_windows(
        base["img_size"], int(base["window_size"]), int(base.get("patch_size", 4)), len(base["depths"])
    )


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile`` in place (``nn.Module.compile``: state-dict keys stay unprefixed, so checkpoints do not
    change). The CPU attention stays one opaque op; inductor fuses the work around it."""
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"compile_mode={mode!r} is not a torch.compile mode; use one of {', '.join(modes)}")
    runtime.fast_paths()  # decided (and calibrated) eagerly, not inside a traced graph
    model.compile(mode=None if mode == "default" else mode)
    return model
