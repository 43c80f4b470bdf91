"""Reading checkpoints: one reader for every layout of SwinV2 weights.

Files: our Lightning ``.ckpt`` (pretraining and fine-tuning), ``encoder.safetensors``, official SimMIM / SwinV2
``.pth``, timm and HF state dicts (torch or safetensors). Folders: HF ``save_pretrained`` and timm hub-style
exports (``config.json`` + weights), and run folders (their checkpoint). Everything comes out in the official
layout without prefix, with the SimMIM pixel decoder apart, the model config when the source records it, and
what else the file says (trainer state, hyper-parameters, class names, provenance) in ``meta``.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simmim.io.files import encoder_provenance, load_encoder
from simmim.models.convert import clean_official, detect_layout, hf_config_to_official, hf_to_official, timm_to_official

__all__ = ["CheckpointError", "PretrainedWeights", "read_pretrained", "checkpoint_in_folder", "windows_from_config"]


class CheckpointError(ValueError):
    """A file that cannot give SwinV2 weights for the model; the message names the file and what to do."""


@dataclass
class PretrainedWeights:
    """Encoder (and head) weights read from a file, in the official layout without prefix."""

    state_dict: dict[str, torch.Tensor]
    source: str  # lightning | encoder-safetensors | official | timm | hf
    path: str
    dropped: list[str] = field(default_factory=list)  # keys outside the SwinV2 and SimMIM weights
    window_sizes: tuple[int, ...] | None = None  # effective per-stage windows the weights were trained with
    config: dict[str, Any] = field(default_factory=dict)  # {"model": name (when known), constructor arguments}
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)  # SimMIM pixel decoder ("0.weight", "0.bias")
    meta: dict[str, Any] = field(default_factory=dict)  # trainer state, hyper-parameters, class names, provenance

    @property
    def kind(self) -> str:
        """simmim (decoder included), classifier (a head) or encoder."""
        return "simmim" if self.decoder else "classifier" if "head.weight" in self.state_dict else "encoder"


_MAGIC = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF file",
    b"\x1f\x8b": "a gzip file",
    b"\x08": "an ONNX model (an inference graph, not trainable weights)",
}
_EXPECT = "Give a .ckpt/.pth/.pt file written by torch.save, a .safetensors file, or an HF/timm export folder"


def _sniff(path: Path, expect: str) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save) or 'safetensors'; else raise saying what the file is."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or download? Save or fetch it again")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors before pickle: its first byte is the header length's low byte, which may well be 0x80
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ "):
        n = int.from_bytes(head[:8], "little")
        if n + 8 > size:
            raise CheckpointError(f"{path} is a truncated safetensors file ({size} bytes, header says more)")
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocols 2-5
        return "pickle"
    what = next((v for k, v in _MAGIC.items() if head.startswith(k)), None)
    if what is None:
        try:
            head.decode("utf-8")
            what = "a text file"
        except UnicodeDecodeError:
            what = "an unknown binary file"
    raise CheckpointError(f"{path} is not a checkpoint (it looks like {what}). {expect}")


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
    def load(weights_only: bool) -> Any:  # mmap: a check of a large checkpoint reads only what it looks at
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=kind == "zip")

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


def _find_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], str]:
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


def _extract_swin(sd: dict[str, torch.Tensor], path: str) -> tuple[dict, dict, list[str], str]:
    """Strip the wrapper prefix found from the patch-embedding key, convert to the official layout, and set the
    SimMIM decoder apart: (encoder state, decoder state, dropped keys, layout)."""
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
    # SimMIM keeps its head beside the encoder: <wrapper>encoder.* and <wrapper>decoder.* (official, ours)
    wrapper = prefix[: -len("encoder.")] if prefix.endswith("encoder.") else None
    decoder_prefix = f"{wrapper}decoder." if wrapper is not None else None
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    decoder = {k[len(decoder_prefix) :]: v for k, v in sd.items() if decoder_prefix and k.startswith(decoder_prefix)}
    dropped = [k for k in sd if not k.startswith(prefix) and not (decoder_prefix and k.startswith(decoder_prefix))]
    if hf:
        state, layout = hf_to_official(kept), "hf"
    else:
        layout = detect_layout(kept)
        state = timm_to_official(kept) if layout == "timm" else clean_official(kept)
    for k in [k for k in state if k.startswith("decoder.")]:  # HF Swinv2ForMaskedImageModeling's head
        decoder[k[len("decoder.") :]] = state.pop(k)
    return state, decoder, dropped, layout


def _windows_from_buffers(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Effective per-stage windows from the official files' relative_position_index buffers ([N, N], N = W^2)."""
    found: dict[int, int] = {}
    for k, v in sd.items():
        m = re.search(r"layers\.(\d+)\.blocks\.0\.attn\.relative_position_index$", k)
        if m:
            found[int(m.group(1))] = math.isqrt(v.shape[0])
    return tuple(found[i] for i in range(len(found))) if found and sorted(found) == list(range(len(found))) else None


def windows_from_config(cfg: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Effective per-stage windows from a model config (img_size, window_size, patch_size, depths or a name)."""
    from simmim.models.registry import config_stage_windows

    if cfg.get("pretrained_window_sizes_effective"):
        return tuple(cfg["pretrained_window_sizes_effective"])
    return config_stage_windows(cfg)


def checkpoint_in_folder(folder: str | Path) -> Path | None:
    """The weights file a folder stands for: a fine-tuning run's ``checkpoints/best.ckpt`` (what it tested), else
    ``checkpoints/last.ckpt`` (a pretraining run's, with the pixel decoder), else ``encoder.safetensors``, else an
    official export's ``model.pth``."""
    folder = Path(folder)
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "encoder.safetensors", "model.pth"):
        if (folder / name).is_file():
            return folder / name
    return None


def _hparams_config(hp: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The model config in a checkpoint's hyper-parameters and the run that wrote it (pretrain / finetune)."""
    if isinstance(hp.get("model_config"), Mapping):  # pretraining (and plain {"state_dict", "model_config"} files)
        return dict(hp["model_config"]), "pretrain" if "norm_target" in hp else None
    if isinstance(hp.get("model_name"), str) and "num_classes" in hp:  # fine-tuning
        cfg = {"model": hp["model_name"], **dict(hp.get("model_kwargs") or {}), "num_classes": hp["num_classes"]}
        return cfg, "finetune"
    return {}, None


def _read_folder(path: Path, trust_checkpoint: bool, expect: str) -> PretrainedWeights:
    """An HF or timm export folder (config.json + weights), or a run folder (its checkpoint)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        inner = checkpoint_in_folder(path)
        if inner is None and (path / "model.onnx").is_file():
            raise CheckpointError(
                f"{path} is an ONNX export: an inference graph, not trainable weights. Give the run or checkpoint it "
                "was exported from, or an hf, timm or official export of it"
            )
        if inner is None:
            raise CheckpointError(
                f"checkpoint {path} is not a file but a folder, and neither an HF/timm export (config.json) nor a run "
                "folder (checkpoints/last.ckpt, encoder.safetensors) nor an official export (model.pth): give the "
                ".ckpt/.pth/.safetensors file itself"
            )
        return read_pretrained(inner, trust_checkpoint, expect)
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}): export the folder again") from None
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has a config.json but no model.safetensors or pytorch_model.bin beside it")
    if "architecture" in cfg:  # timm hub layout: {"architecture", "model_args", "pretrained_cfg", ...}
        config = dict(cfg.get("model_args") or {})
        config.setdefault("num_classes", cfg.get("num_classes", 0))
        names = (cfg.get("pretrained_cfg") or {}).get("label_names")
    elif cfg.get("model_type") == "swinv2":
        config = hf_config_to_official(cfg)
        names = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))] if cfg.get("id2label") else None
    else:
        kind = cfg.get("model_type", "unknown")
        raise CheckpointError(f"{cfg_file} describes a {kind} model, not a SwinV2 (HF model_type swinv2, or timm)")
    out = read_pretrained(weights, trust_checkpoint, expect)
    out.config = {**config, **out.config}
    out.window_sizes = out.window_sizes or windows_from_config(out.config)
    out.meta.setdefault("folder", str(path))
    if names and "head.weight" in out.state_dict and len(names) == out.state_dict["head.weight"].shape[0]:
        out.meta["class_names"] = list(names)
    return out


def read_pretrained(
    path: str | Path | Mapping[str, Any], trust_checkpoint: bool = False, expect: str = _EXPECT
) -> PretrainedWeights:
    """Read SwinV2 weights from any supported file or folder (see the module docstring), or from a checkpoint
    dict already in memory. Pickles are read with ``weights_only=True``; classes other than tensors and numpy
    values (the official yacs ``config``) become plain dicts and never execute. ``trust_checkpoint=True`` falls
    back to full unpickling, only for files from a trusted source. ``expect`` ends the message for a file that
    is no checkpoint at all (what to give instead)."""
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if isinstance(path, Mapping):
        obj, label = path, "(checkpoint in memory)"
    else:
        label = str(path)
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_dir():
            return _read_folder(path, trust_checkpoint, expect)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is not a file")
        kind = _sniff(path, expect)
        if kind == "safetensors":
            try:
                sd, config = load_encoder(path)
                meta["provenance"] = encoder_provenance(path)
            except Exception as e:
                raise CheckpointError(f"{path} is a corrupt safetensors file ({e})") from None
            obj = None
        else:
            obj = _torch_load(path, kind, trust_checkpoint)
    if obj is not None:
        sd, container = _find_state_dict(obj, label)
        hp = obj.get("hyper_parameters", obj) if isinstance(obj, Mapping) else {}
        config, meta["trained_by"] = _hparams_config(hp if isinstance(hp, Mapping) else {})
        for key in ("global_step", "epoch", "hyper_parameters", "datamodule_hyper_parameters"):
            if key in obj:
                meta[key] = obj[key]
        if isinstance(hp, Mapping) and hp.get("class_names"):
            meta["class_names"] = list(hp["class_names"])
    else:
        container = "encoder-safetensors" if config else "safetensors"  # ours record their config
    windows = _windows_from_buffers(sd)
    state, decoder, dropped, layout = _extract_swin(sd, label)
    if windows is None and config:
        windows = windows_from_config(config)
    source = container if container in ("lightning", "encoder-safetensors") else layout
    return PretrainedWeights(state, source, label, dropped, windows, config, decoder, meta)
