"""The model card (README.md) every export carries: the model, its data, recipe, steps, final loss or top-1, and
how to load the folder."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from omegaconf import OmegaConf

from simmim.export.source import Source

__all__ = ["model_card"]

_CONTENTS = {
    "simmim": "SimMIM pretraining checkpoint: encoder, mask token and pixel decoder",
    "encoder": "SimMIM-pretrained encoder (features; no head)",
    "classifier": "fine-tuned classifier: encoder and linear head",
}
_NOT_RECORDED = "not recorded in the source"


def _data(recipe: dict[str, Any] | None) -> str:
    if not recipe:
        return _NOT_RECORDED
    d = recipe.get("data") or {}
    root = d.get("root")
    where = f"`{root}`" if root else "Fashion-MNIST (the default data)"
    extra = [f"{k} {d[k]}" for k in ("source", "label_fraction", "mask_ratio", "mask_patch_size") if k in d]
    return where + (f" ({', '.join(extra)})" if extra else "")


def _parameters(src: Source) -> str:
    n = sum(math.prod(v.shape) for v in src.weights.state_dict.values()) + sum(
        math.prod(v.shape) for v in src.weights.decoder.values()
    )
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def model_card(src: Source, fmt: str, files: list[str], usage: str, notes: list[str]) -> str:
    """README.md for an export of ``src`` in ``fmt`` holding ``files``."""
    from simmim import __version__

    c = src.config
    name = c.get("model") or "custom SwinV2"
    recipe = src.recipe or {}
    if src.top1 is not None:
        result = f"top-1 {src.top1[0]:.2f}% ({src.top1[1]} split)"
    elif src.final_loss is not None:
        result = f"final training loss {src.final_loss:.4f} (masked L1" + (
            ", NORM_TARGET)" if (recipe.get("model") or {}).get("norm_target") else ")"
        )
    else:
        result = _NOT_RECORDED
    rows = [
        ("model", f"{name}: embed_dim {c['embed_dim']}, depths {c['depths']}, heads {c['num_heads']}, window "
                  f"{c['window_size']}, {c['img_size']} px, patch {c['patch_size']}; {_parameters(src)} parameters"),
        ("contents", _CONTENTS[src.kind] + (f", {src.num_classes} classes" if src.kind == "classifier" else "")),
        ("data", _data(src.recipe)),
        ("recipe", f"`{recipe.get('recipe')}` (in full below)" if recipe else _NOT_RECORDED),
        ("steps", str(src.steps) if src.steps is not None else _NOT_RECORDED),
        ("result", result),
        ("input", f"{c['img_size']} px RGB, normalised with mean {list(src.mean)}, std {list(src.std)}"),
        ("exported", f"from `{src.path}` by simmim {__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"),
    ]  # fmt: skip
    lines = [f"# {name} ({src.kind}), {fmt} export", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Files: {', '.join(f'`{f}`' for f in files)}.", "", "## How to load", "", "```python", usage, "```"]
    if src.class_names and src.kind == "classifier":
        lines += ["", "## Classes", "", ", ".join(f"{i}: {n}" for i, n in enumerate(src.class_names))]
    all_notes = [*src.notes, *notes]
    if all_notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in all_notes]
    if src.recipe:
        lines += ["", "## Recipe", "", "<details><summary>resolved recipe</summary>", "", "```yaml"]
        lines += [OmegaConf.to_yaml(OmegaConf.create(src.recipe)).rstrip(), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
