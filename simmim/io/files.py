"""Writing files: one atomic writer for every format (torch, safetensors, YAML, JSON, text), one temporary-name
scheme, one clean-up of the temporaries that writers killed mid-write leave, and the exported encoder file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "temporary_path",
    "remove_stale_temporaries",
    "atomic_write",
    "save_torch",
    "save_safetensors",
    "save_text",
    "save_json",
    "save_encoder",
    "load_encoder",
    "encoder_provenance",
    "ENCODER_FORMAT",
]

ENCODER_FORMAT = "simmim-swinv2-encoder"  # encoder.safetensors metadata "format"
_TMP = ".tmp"


def temporary_path(path: str | Path) -> Path:
    """Where a write to ``path`` goes before its rename: ``.NAME.tmpPID`` in the same folder (the rename is then
    atomic, and the pid tells :func:`remove_stale_temporaries` whose it is)."""
    path = Path(path)
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}")


def _writer_pid(name: str) -> int | None:
    """The pid in a name of :func:`temporary_path`'s scheme (None for any other name)."""
    if not name.startswith(".") or _TMP not in name:
        return None
    pid = name.rsplit(_TMP, 1)[-1]
    return int(pid) if pid.isdigit() else None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-write left in ``folder`` (those of processes no longer
    running on this machine); returns them. A run calls this on its folders at start."""
    folder = Path(folder)
    removed = []
    for tmp in sorted(folder.iterdir()) if folder.is_dir() else []:
        pid = _writer_pid(tmp.name)
        if pid is None or pid == os.getpid() or not tmp.is_file():
            continue
        try:
            os.kill(pid, 0)
            continue  # a live process's write in progress
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary)`` writes the file's content to a temporary path in the same folder; it is then fsynced
    and renamed over ``path``. A crash or a kill never leaves half a file at ``path``: the previous file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() makes files (some writers, e.g. safetensors', make them 0600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (checkpoints, official ``.pth`` exports)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """A safetensors file, atomically; tensors are saved contiguous, on the CPU (views of one storage are copied)."""
    from safetensors.torch import save_file

    flat = {k: _standalone(v) for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=dict(metadata or {})))


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses views that share one, e.g. q/k/v chunks)."""
    t = t.detach().cpu().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def save_text(text: str, path: str | Path) -> Path:
    """A UTF-8 text file (YAML recipes, model cards), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: str | Path) -> Path:
    """JSON (indented), atomically; paths are written as strings."""
    return save_text(json.dumps(obj, indent=2, default=str) + "\n", path)


def save_encoder(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Save encoder weights (official key names, no prefix) as safetensors. Metadata: the model ``config`` that
    rebuilds it, the library version and, when given, where the weights come from (``provenance``: ``recipe``,
    ``steps``, ``final_loss``, ...; see :func:`encoder_provenance`)."""
    from simmim import __version__

    meta = {"format": ENCODER_FORMAT, "config": json.dumps(dict(config)), "simmim_version": __version__}
    for key, value in (provenance or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return save_safetensors(state_dict, path, meta)


def load_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an exported encoder: (state dict, model config)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, json.loads(meta.get("config", "{}"))


def encoder_provenance(path: str | Path) -> dict[str, Any]:
    """The metadata of a safetensors file other than its ``format`` and ``config``, JSON values decoded: for an
    ``encoder.safetensors`` the ``recipe`` (dict), ``steps``, ``final_loss`` and ``simmim_version``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key in ("format", "config"):
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
