"""The weight formats: an HF ``save_pretrained`` folder, a timm hub-style folder, an official ``.pth``. Each writer
puts its files in ``out`` through :mod:`simmim.io`'s atomic writer and returns their names and how to load them.
Keys go through :mod:`simmim.models.convert`; no writer needs transformers or timm installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simmim.export.source import ExportError, Source
from simmim.io import model_from_weights, save_json, save_safetensors, save_torch
from simmim.models.convert import official_config_to_hf, official_to_hf, official_to_timm

__all__ = ["write_hf", "write_timm", "write_official", "HF_CLASSES"]

HF_CLASSES = {
    "encoder": "Swinv2Model",
    "simmim": "Swinv2ForMaskedImageModeling",
    "classifier": "Swinv2ForImageClassification",
}
# timm's registered SwinV2 family whose sizes match ours (geometry is passed as model_args anyway)
_TIMM_ARCH = {"swinv2_small": "swinv2_small_window8_256", "swinv2_base": "swinv2_base_window12_192",
              "swinv2_large": "swinv2_large_window12_192"}  # fmt: skip
_TIMM_DEFAULT = "swinv2_tiny_window8_256"


def _no_ape(src: Source, fmt: str) -> None:
    if src.config.get("ape"):
        raise ExportError(
            f"{src.path}: the model has an absolute position embedding (ape=true), which {fmt} SwinV2 lacks: "
            "export it with --to official or --to onnx"
        )


def _official_state(src: Source, with_decoder: bool) -> dict[str, torch.Tensor]:
    """The source's weights in the official layout without prefix (``decoder.*`` for SimMIM's head)."""
    sd = dict(src.weights.state_dict)
    if with_decoder:
        sd.update({f"decoder.{k}": v for k, v in src.weights.decoder.items()})
    else:
        sd.pop("mask_token", None)
    return sd


def write_hf(src: Source, out: Path) -> tuple[list[str], str, list[str]]:
    """config.json, model.safetensors (HF keys) and preprocessor_config.json for ``transformers``."""
    _no_ape(src, "HF")
    cls = HF_CLASSES[src.kind]
    prefix = "" if src.kind == "encoder" else "swinv2."  # Swinv2Model's own keys; the task models' swinv2.*
    hf_sd = official_to_hf(_official_state(src, src.kind == "simmim"), prefix=prefix)
    config: dict[str, Any] = {"model_type": "swinv2", "architectures": [cls], **official_config_to_hf(src.config)}
    config.update(hidden_act="gelu", layer_norm_eps=1e-5, dtype="float32")
    if src.kind == "classifier":
        names = src.class_names or []
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    height, width = src.size
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(src.mean),
        "image_std": list(src.std),
    }
    save_safetensors(hf_sd, out / "model.safetensors", {"format": "pt"})
    save_json(config, out / "config.json")
    save_json(processor, out / "preprocessor_config.json")
    usage = (
        f"from transformers import AutoImageProcessor, {cls}\n\n"
        f'model = {cls}.from_pretrained("{out}")\n'
        f'processor = AutoImageProcessor.from_pretrained("{out}")'
    )
    notes = [
        "transformers adds the shifted-window mask twice (-200 where the official code and simmim use -100): outputs "
        "agree with simmim's while the attention temperatures stay moderate, and can "
        "differ for heads whose logit scale nears its clamp (100)",
        f"the preprocessor resizes to {height}x{width} px without a centre crop (simmim's evaluation resizes, then "
        "crops)",
    ]
    if src.kind == "simmim" and (src.recipe or {}).get("model", {}).get("norm_target"):
        notes.append("trained with NORM_TARGET: the reconstruction is in locally normalised pixels, while "
                     "Swinv2ForMaskedImageModeling's built-in loss compares it with raw pixels")  # fmt: skip
    return ["config.json", "model.safetensors", "preprocessor_config.json"], usage, notes


def timm_config(src: Source) -> dict[str, Any]:
    """The timm hub config.json: architecture, model_args (our geometry) and the pretrained_cfg."""
    c = src.config
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
            "qkv_bias", "pretrained_window_sizes")  # fmt: skip
    model_args = {k: c[k] for k in keys} | {"num_classes": src.num_classes}
    pretrained_cfg = {
        "tag": "simmim",
        "input_size": [c["in_chans"], *src.size],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_mode": "center",
        "mean": list(src.mean),
        "std": list(src.std),
        "num_classes": src.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
    }
    if src.crop_pct is not None:
        pretrained_cfg["crop_pct"] = round(src.crop_pct, 4)
    if src.class_names and src.kind == "classifier":
        pretrained_cfg["label_names"] = list(src.class_names)
    return {
        "architecture": _TIMM_ARCH.get(str(c.get("model")), _TIMM_DEFAULT),
        "num_classes": src.num_classes,
        "num_features": int(c["embed_dim"] * 2 ** (len(c["depths"]) - 1)),
        "global_pool": "avg",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def write_timm(src: Source, out: Path) -> tuple[list[str], str, list[str]]:
    """model.safetensors (timm keys; the encoder and its head, timm has no SimMIM model) and config.json."""
    _no_ape(src, "timm")
    save_safetensors(official_to_timm(_official_state(src, False)), out / "model.safetensors")
    cfg = timm_config(src)
    save_json(cfg, out / "config.json")
    usage = (
        "import json, timm\n\n"
        f'model = timm.create_model("local-dir:{out}", pretrained=True)\n'
        "# or, naming the architecture and the file:\n"
        f'cfg = json.load(open("{out / "config.json"}"))\n'
        f'overlay = dict(cfg["pretrained_cfg"], file="{out / "model.safetensors"}")\n'
        'model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, '
        '**cfg["model_args"])'
    )
    notes = []
    if src.kind == "simmim":
        notes.append("timm has no SimMIM model: this export holds the encoder; the mask token and the pixel decoder "
                     "are in the hf and official exports")  # fmt: skip
    return ["model.safetensors", "config.json"], usage, notes


def official_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers the official SwinV2 saves and we rebuild (position tables and indices, shifted-window masks),
    so the official model loads the file strictly."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "relative_coords_table"):
            out[f"{name}.relative_coords_table"] = mod.relative_coords_table.clone()
            out[f"{name}.relative_position_index"] = mod.relative_position_index.clone()
        if hasattr(mod, "shift_size") and any(mod.shift_size):
            mask = mod.attn_mask(*mod.input_resolution, torch.device("cpu"))
            out[f"{name}.attn_mask"] = mask.dense().clone()
    return out


def write_official(src: Source, out: Path) -> tuple[list[str], str, list[str]]:
    """model.pth: ``{"model": ...}`` as the official code saves it. A SimMIM checkpoint in the pretraining layout
    (``encoder.*`` with the mask token, ``decoder.*``), an encoder or a classifier in the classification layout;
    with the official buffers, and our model config beside (the official loaders ignore extra keys)."""
    encoder = model_from_weights(src.weights)
    sd = _official_state(src, src.kind == "simmim")
    buffers = official_buffers(encoder)
    if src.kind == "simmim":
        state = {f"encoder.{k}" if not k.startswith("decoder.") else k: v for k, v in sd.items()}
        state.update({f"encoder.{k}": v for k, v in buffers.items()})
    else:
        state = {**sd, **buffers}
    ckpt: dict[str, Any] = {"model": state, "model_config": dict(src.config)}
    if src.top1 is not None:
        ckpt["max_accuracy"] = src.top1[0]
    save_torch(ckpt, out / "model.pth")
    what = "the SimMIM pretraining layout" if src.kind == "simmim" else "the classification layout"
    usage = (
        f"# {what}: the official code's --pretrained / --resume accept it (MODEL.PRETRAINED={out / 'model.pth'})\n"
        "import torch\n\n"
        f'state = torch.load("{out / "model.pth"}", map_location="cpu")["model"]'
    )
    return ["model.pth"], usage, []
