"""Writing and reading weights: atomic saves, the exported encoder file (safetensors + its config), and
loading pretrained SwinV2 weights from any layout (ours, official, timm, HF) into a model."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simmim.models.convert import clean_official, detect_layout, hf_to_official, timm_to_official

__all__ = [
    "atomic_torch_save",
    "remove_stale_temporaries",
    "save_encoder",
    "load_encoder",
    "CheckpointError",
    "PretrainedWeights",
    "LoadReport",
    "read_pretrained",
    "load_pretrained",
]


def _temporary(path: Path) -> Path:
    """Where a save to ``path`` writes before the rename: ``.NAME.tmpPID`` (the pid tells whose it is)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that saves killed mid-write left in ``folder`` (those of processes no longer
    running on this machine); returns them. A run calls this on its folders at start."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*") if Path(folder).is_dir() else []:
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a live process's save in progress
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
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
    tmp = _temporary(path)
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


# ---- reading pretrained weights of any layout -------------------------------------------------------------


class CheckpointError(ValueError):
    """A file that cannot give SwinV2 weights for the model; the message names the file and what to do."""


@dataclass
class PretrainedWeights:
    """Encoder (and head) weights read from a file, in the official layout without prefix."""

    state_dict: dict[str, torch.Tensor]
    source: str  # lightning | encoder-safetensors | official | timm | hf
    path: str
    dropped: list[str] = field(default_factory=list)  # keys outside the SwinV2 weights (decoder, ...)
    window_sizes: tuple[int, ...] | None = None  # effective per-stage windows the weights were trained with
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys loaded, dropped (not used) and newly initialised (missing)."""

    path: str
    source: str
    loaded: list[str]
    dropped: list[str]
    missing: list[str]
    pretrained_window_sizes: tuple[int, ...] | None = None

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.source} layout)"]
        if self.pretrained_window_sizes is not None:
            lines.append(f"  weights trained with windows {list(self.pretrained_window_sizes)}")
        for name, keys in (("dropped (not used)", self.dropped), ("newly initialised", self.missing)):
            if keys:
                shown = ", ".join(_summarise(keys))
                lines.append(f"  {name}: {len(keys)}: {shown}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "loaded": len(self.loaded),
            "dropped": self.dropped,
            "missing": self.missing,
            "pretrained_window_sizes": list(self.pretrained_window_sizes or []) or None,
        }


def _summarise(keys: list[str], limit: int = 8) -> list[str]:
    """Group keys by their first two name parts (decoder.0.*) so reports stay short."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[g] = groups.get(g, 0) + 1
    out = [g if n == 1 else f"{g} ({n})" for g, n in groups.items()]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


_MAGIC = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF file",
    b"\x1f\x8b": "a gzip file",
}


def _sniff(path: Path) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save) or 'safetensors'; else raise saying what the file is."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or download? Save or fetch it again")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ "):
        n = int.from_bytes(head[:8], "little")
        if n + 8 > size:
            raise CheckpointError(f"{path} is a truncated safetensors file ({size} bytes, header says more)")
        return "safetensors"
    what = next((v for k, v in _MAGIC.items() if head.startswith(k)), None)
    if what is None:
        try:
            head.decode("utf-8")
            what = "a text file"
        except UnicodeDecodeError:
            what = "an unknown binary file"
    raise CheckpointError(
        f"{path} is not a checkpoint (it looks like {what}). Give a .ckpt/.pth/.pt file written by torch.save "
        "or a .safetensors file"
    )


def _numpy_globals() -> list[Any]:
    import numpy as np

    return [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


def _safe_globals(path: Path) -> list[Any]:
    """An allowlist for the weights-only unpickler: numpy scalars/arrays and paths as themselves, any other class
    (the official files' yacs ``config``, omegaconf hyper-parameters) read as a plain OrderedDict, never run."""
    import importlib

    allow: list[Any] = []
    numpy_seen = False
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] == "numpy":
            allow.append(getattr(importlib.import_module(module), attr))
            numpy_seen = True
        elif module == "pathlib" and attr in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            allow.append(getattr(importlib.import_module(module), attr))  # data roots in saved hyper-parameters
        else:
            allow.append((OrderedDict, name))
    return allow + (_numpy_globals() if numpy_seen else [])


def _unsafe(path: Path, err: Exception) -> CheckpointError:
    found = re.findall(r"GLOBAL ([\w.]+)", str(err))
    what = f" ({', '.join(dict.fromkeys(found))})" if found else ""
    return CheckpointError(
        f"{path} holds Python objects the safe loader does not read{what}. If you trust the file's source, pass "
        "trust_checkpoint=True (CLI: trust_checkpoint=true) to unpickle it fully"
    )


def _torch_load(path: Path, kind: str, trust_checkpoint: bool) -> Any:
    def load(weights_only: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        if trust_checkpoint:
            return load(weights_only=False)
        try:
            return load(weights_only=True)
        except pickle.UnpicklingError as first:
            if kind != "zip":
                raise _unsafe(path, first) from None
            try:
                with torch.serialization.safe_globals(_safe_globals(path)):
                    return load(weights_only=True)
            except Exception:
                raise _unsafe(path, first) from None
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupt ({msg}): an interrupted save or copy? Save or fetch it again"
        ) from None


def _find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor mapping inside a loaded checkpoint and the container it came from."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    for key, source in (("state_dict", "lightning"), ("model", "official"), ("module", "deepspeed")):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, source
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, "state_dict"
    if not obj:  # e.g. a whole pickled nn.Module: the safe loader keeps none of it
        raise CheckpointError(
            f"{path} holds nothing the safe loader can read (a whole pickled model?): save model.state_dict() "
            "instead, or pass trust_checkpoint=true if you trust the file's source"
        )
    raise CheckpointError(
        f"{path} has no state dict (top-level keys: {', '.join(map(str, list(obj)[:10]))}); expected 'state_dict' "
        "(Lightning), 'model' (official) or a plain name -> tensor mapping"
    )


_ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")


def _extract_swin(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Strip the wrapper prefix found from the patch-embedding key, convert to the official layout."""
    anchor = next((k for k in sd if k.endswith(_ANCHORS)), None)
    if anchor is None or not any(".blocks." in k and ".attn" in k or "attention.self" in k for k in sd):
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(
            f"{path} has no SwinV2 weights: no key ends with 'patch_embed.proj.weight' next to window-attention "
            f"blocks (first keys: {sample})"
        )
    hf = anchor.endswith(_ANCHORS[1])
    prefix = anchor[: -len(_ANCHORS[1] if hf else _ANCHORS[0])]
    if hf and prefix.endswith("swinv2."):
        prefix = prefix[: -len("swinv2.")]  # keep HF's own swinv2./classifier./decoder. names for hf_to_official
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = [k for k in sd if not k.startswith(prefix)]
    if hf:
        return hf_to_official(kept), dropped, "hf"
    layout = detect_layout(kept)
    return (timm_to_official(kept) if layout == "timm" else clean_official(kept)), dropped, layout


def _windows_from_buffers(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Effective per-stage windows from the official files' relative_position_index buffers ([N, N], N = W^2)."""
    found: dict[int, int] = {}
    for k, v in sd.items():
        m = re.search(r"layers\.(\d+)\.blocks\.0\.attn\.relative_position_index$", k)
        if m:
            found[int(m.group(1))] = math.isqrt(v.shape[0])
    return tuple(found[i] for i in range(len(found))) if found and sorted(found) == list(range(len(found))) else None


def _windows_from_config(cfg: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Effective per-stage windows from a model config (img_size, window_size, patch_size, depths or a name)."""
    from simmim.models.registry import config_stage_windows

    if cfg.get("pretrained_window_sizes_effective"):
        return tuple(cfg["pretrained_window_sizes_effective"])
    return config_stage_windows(cfg)


def read_pretrained(path: str | Path, trust_checkpoint: bool = False) -> PretrainedWeights:
    """Read SwinV2 weights from any supported file: our Lightning ``.ckpt`` and ``encoder.safetensors``, official
    SimMIM / SwinV2 checkpoints, timm and HF state dicts. Pickles are read with ``weights_only=True``; classes
    other than tensors and numpy values (the official yacs ``config``) become plain dicts and never execute.
    ``trust_checkpoint=True`` falls back to full unpickling, only for files from a trusted source."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file (a folder? give the .ckpt/.safetensors file in it)")
    kind = _sniff(path)
    config: dict[str, Any] = {}
    if kind == "safetensors":
        try:
            sd, config = load_encoder(path)
        except Exception as e:
            raise CheckpointError(f"{path} is a corrupt safetensors file ({e})") from None
        container = "encoder-safetensors"
    else:
        obj = _torch_load(path, kind, trust_checkpoint)
        sd, container = _find_state_dict(obj, path)
        hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
        if isinstance(hp, Mapping) and isinstance(hp.get("model_config"), Mapping):
            config = dict(hp["model_config"])
    windows = _windows_from_buffers(sd)
    state, dropped, layout = _extract_swin(sd, path)
    if windows is None and config:
        windows = _windows_from_config(config)
    source = container if container in ("lightning", "encoder-safetensors") else layout
    return PretrainedWeights(state, source, str(path), dropped, windows, config)


def _likely_cause(key: str, src: torch.Tensor, dst: torch.Tensor, weights: PretrainedWeights, model: Any) -> str:
    ckpt_dim = weights.state_dict.get("patch_embed.proj.weight")
    if ckpt_dim is not None and ckpt_dim.shape[0] != model.embed_dim:
        trained = weights.config.get("model")  # our files carry their model's name
        return (
            f"the checkpoint's embed_dim is {ckpt_dim.shape[0]} and the model's {model.embed_dim}: a different model "
            "size; pick the model the weights were trained with"
            + (f" (model.name={trained})" if isinstance(trained, str) else "")
        )
    if key.endswith(("logit_scale", "cpb_mlp.2.weight")):
        return "a different number of attention heads: pick the model the weights were trained with"
    if key.startswith("patch_embed.proj"):
        return "a different patch size or number of input channels"
    return "a different model configuration"


def load_pretrained(
    model: torch.nn.Module,
    path: str | Path | PretrainedWeights,
    strict_shapes: bool = True,
    trust_checkpoint: bool = False,
) -> LoadReport:
    """Load SwinV2 weights from ``path`` (any layout :func:`read_pretrained` reads) into ``model``.

    Windows and resolutions may differ: the model rebuilds its position tables; build it with
    ``pretrained_window_sizes`` = the report's ``pretrained_window_sizes`` for the official transfer. A
    classification head of another shape (new ``num_classes``) is left newly initialised. With ``strict_shapes``
    any other shape mismatch, or blocks only one side has (different depths), raises :class:`CheckpointError`;
    without, such keys are left newly initialised and listed in the report."""
    weights = path if isinstance(path, PretrainedWeights) else read_pretrained(path, trust_checkpoint)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    dropped = list(weights.dropped)
    for k, v in weights.state_dict.items():
        if k not in own:
            dropped.append(k)
        elif own[k].shape != v.shape:
            if strict_shapes and not k.startswith("head."):
                raise CheckpointError(
                    f"{weights.path}: {k} has shape {list(v.shape)} in the checkpoint but {list(own[k].shape)} in "
                    f"the model: {_likely_cause(k, v, own[k], weights, model)}"
                )
            dropped.append(k)
        else:
            to_load[k] = v
    if strict_shapes:
        ckpt_blocks = {m.group(0) for k in weights.state_dict if (m := re.match(r"layers\.\d+\.blocks\.\d+", k))}
        own_blocks = {m.group(0) for k in own if (m := re.match(r"layers\.\d+\.blocks\.\d+", k))}
        if ckpt_blocks != own_blocks:
            diff = sorted(ckpt_blocks ^ own_blocks)
            raise CheckpointError(
                f"{weights.path}: the checkpoint has {len(ckpt_blocks)} blocks and the model {len(own_blocks)} "
                f"({', '.join(diff[:4])} on one side only): different depths, a different model size; pick the model "
                "the weights were trained with"
            )
    if not to_load:
        raise CheckpointError(f"{weights.path}: none of its {len(weights.state_dict)} SwinV2 tensors fit the model")
    missing = [k for k in own if k not in to_load]
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
    return LoadReport(weights.path, weights.source, sorted(to_load), sorted(dropped), missing, weights.window_sizes)
