"""State-dict conversion between the official SwinV2 layout (ours) and timm's and HF transformers' layouts.

All functions take and return plain ``{name: tensor}`` dicts and never build a model, so they work on any size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = [
    "REBUILT_BUFFERS",
    "clean_official",
    "official_to_timm",
    "timm_to_official",
    "official_to_hf",
    "hf_to_official",
    "detect_layout",
    "official_config_to_hf",
    "hf_config_to_official",
]

# Buffers the official code saves but that follow from geometry; dropped on load, rebuilt by the model.
REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")

StateDict = Mapping[str, torch.Tensor]


def _is_rebuilt(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in REBUILT_BUFFERS


def clean_official(sd: StateDict) -> dict[str, torch.Tensor]:
    """Official-layout keys, minus rebuilt buffers, with the released checkpoints' ``rpe_mlp`` named ``cpb_mlp``."""
    return {k.replace(".rpe_mlp.", ".cpb_mlp."): v for k, v in sd.items() if not _is_rebuilt(k)}


def official_to_timm(sd: StateDict) -> dict[str, torch.Tensor]:
    """Official -> timm ``swinv2_*``: downsample moves to the start of the next stage, ``head`` -> ``head.fc``."""
    out = {}
    for k, v in clean_official(sd).items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        elif k.startswith("head."):
            k = "head.fc." + k[len("head.") :]
        out[k] = v
    return out


def timm_to_official(sd: StateDict) -> dict[str, torch.Tensor]:
    """timm ``swinv2_*`` -> official (inverse of :func:`official_to_timm`)."""
    out = {}
    for k, v in sd.items():
        if _is_rebuilt(k):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif k.startswith("head.fc."):
            k = "head." + k[len("head.fc.") :]
        out[k] = v
    return out


_HF_BLOCK = {
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp.0.weight": "attention.self.continuous_position_bias_mlp.0.weight",
    "attn.cpb_mlp.0.bias": "attention.self.continuous_position_bias_mlp.0.bias",
    "attn.cpb_mlp.2.weight": "attention.self.continuous_position_bias_mlp.2.weight",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    # HF names the post-norms after their old (v1) places; they are applied after each branch as in v2.
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
_HF_TOP = {
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "patch_embed.norm.weight": "embeddings.norm.weight",
    "patch_embed.norm.bias": "embeddings.norm.bias",
    "mask_token": "embeddings.mask_token",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK_INV = {v: k for k, v in _HF_BLOCK.items()}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_BLOCK_RE = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)")


def official_to_hf(sd: StateDict, prefix: str = "swinv2.") -> dict[str, torch.Tensor]:
    """Official -> HF ``Swinv2Model`` keys under ``prefix`` (``swinv2.`` for the task models); head -> classifier."""
    out = {}
    for k, v in clean_official(sd).items():
        if k.startswith("head."):
            out["classifier." + k[len("head.") :]] = v
            continue
        if k == "mask_token":  # ours [1, 1, C]; HF's [1, 1, C] too
            out[prefix + _HF_TOP[k]] = v
            continue
        if k.startswith("decoder."):  # SimMIM's pixel head: Swinv2ForMaskedImageModeling's, same names, no prefix
            out[k] = v
            continue
        m = _BLOCK_RE.match(k)
        if m:
            stage, blk, rest = m.groups()
            base = f"{prefix}encoder.layers.{stage}.blocks.{blk}."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3, dim=0)
                out[base + "attention.self.query.weight"] = q
                out[base + "attention.self.key.weight"] = kk
                out[base + "attention.self.value.weight"] = vv
            elif rest == "attn.q_bias":
                out[base + "attention.self.query.bias"] = v
            elif rest == "attn.v_bias":
                out[base + "attention.self.value.bias"] = v
            else:
                out[base + _HF_BLOCK[rest]] = v
        elif k.startswith("layers."):  # downsample: same place and names in HF
            out[prefix + "encoder." + k] = v
        elif k in _HF_TOP:
            out[prefix + _HF_TOP[k]] = v
        else:
            raise KeyError(f"no HF name for official key {k!r}")
    return out


def hf_to_official(sd: StateDict) -> dict[str, torch.Tensor]:
    """HF ``Swinv2Model`` / ``Swinv2For*`` keys (with or without ``swinv2.``) -> official."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if _is_rebuilt(k) or k.endswith("relative_position_bias_table"):
            continue
        if k.startswith("classifier."):
            out["head." + k[len("classifier.") :]] = v
            continue
        if k.startswith("decoder."):  # Swinv2ForMaskedImageModeling head, same layout as SimMIM's
            out["decoder.0." + k.split(".", 2)[-1]] = v
            continue
        k = k[len("swinv2.") :] if k.startswith("swinv2.") else k
        if k in _HF_TOP_INV:
            out[_HF_TOP_INV[k]] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", k)
        if m:
            stage, blk, rest = m.groups()
            base = f"layers.{stage}.blocks.{blk}."
            p = re.match(r"attention\.self\.(query|key|value)\.(weight|bias)", rest)
            if p:
                qkv.setdefault(base, {})[f"{p.group(1)}.{p.group(2)}"] = v
            else:
                out[base + _HF_BLOCK_INV[rest]] = v
        elif k.startswith("encoder.layers."):
            out[k[len("encoder.") :]] = v
        else:
            raise KeyError(f"no official name for HF key {k!r}")
    for base, parts in qkv.items():
        out[base + "attn.qkv.weight"] = torch.cat([parts["query.weight"], parts["key.weight"], parts["value.weight"]])
        if "query.bias" in parts:
            out[base + "attn.q_bias"] = parts["query.bias"]
            out[base + "attn.v_bias"] = parts["value.bias"]
    return out


def detect_layout(sd: StateDict) -> str:
    """'official', 'timm' or 'hf', judged from characteristic key names."""
    keys = list(sd)
    if any("attention.self." in k or k.startswith(("swinv2.", "embeddings.")) for k in keys):
        return "hf"
    # timm puts patch merging at the start of stages 1..n-1 (so the last stage has one), official at the end.
    stages = [int(m.group(1)) for k in keys if (m := re.match(r"(?:encoder\.)?layers\.(\d+)\.", k))]
    last = max(stages, default=-1)
    if any(k.startswith("head.fc.") for k in keys) or any(
        re.match(rf"(?:encoder\.)?layers\.{last}\.downsample\.", k) for k in keys
    ):
        return "timm"
    return "official"


# Model configs: our constructor's arguments <-> HF Swinv2Config fields (timm's model_args use our names).
_HF_CONFIG = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "embed_dim": "embed_dim",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_size": "window_size",
    "pretrained_window_sizes": "pretrained_window_sizes",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "drop_path_rate": "drop_path_rate",
    "ape": "use_absolute_embeddings",
}


def official_config_to_hf(cfg: Mapping[str, object]) -> dict[str, object]:
    """Constructor arguments (``embed_dim``, ``depths``, ...; complete ones) -> ``Swinv2Config`` fields, with the
    SimMIM head's ``encoder_stride`` (patch size x 2^(stages - 1), as our and the official SimMIM compute it)."""
    out = {hf: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k, hf in _HF_CONFIG.items() if k in cfg}
    if "pretrained_window_sizes" in out:
        # Log-CPB divides coordinates by max(p - 1, 1) here and in timm, by p - 1 in HF (0/0 for p = 1, e.g. the
        # 1x1 last stage of a small model): p = 2 gives HF the same table
        out["pretrained_window_sizes"] = [2 if p == 1 else p for p in out["pretrained_window_sizes"]]  # type: ignore
    if "patch_size" in cfg and "depths" in cfg:
        out["encoder_stride"] = int(cfg["patch_size"]) * 2 ** (len(cfg["depths"]) - 1)  # type: ignore[arg-type]
    return out


def hf_config_to_official(cfg: Mapping[str, object]) -> dict[str, object]:
    """``Swinv2Config`` fields (a config.json) -> our constructor's arguments (inverse of the above)."""
    return {k: cfg[hf] for k, hf in _HF_CONFIG.items() if hf in cfg}
