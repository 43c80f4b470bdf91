"""Writing and reading weights: atomic saves and the exported encoder file (safetensors + its config)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "save_encoder", "load_encoder"]


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_encoder(state_dict: Mapping[str, torch.Tensor], path: str | Path, config: Mapping[str, Any]) -> Path:
    """Save encoder weights (official key names, no prefix) as safetensors, with the model config as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "simmim-swinv2-encoder", "config": json.dumps(dict(config))})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an exported encoder: (state dict, model config)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, json.loads(meta.get("config", "{}"))
