"""Putting read weights to use: loading them into an encoder or a whole SimMIM model (pixel decoder and mask token
included) with a report of what was and was not taken, models rebuilt from a checkpoint, and the pre-flight check
of a checkpoint to resume from."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simmim.io.read import CheckpointError, PretrainedWeights, read_pretrained
from simmim.io.schema import GEOMETRY, build_encoder, describe, full_config, geometry_of, model_name_for

__all__ = ["LoadReport", "load_pretrained", "simmim_from_weights", "model_from_weights", "check_resume"]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: keys loaded, dropped (not used) and newly initialised (missing). Encoder
    keys are official names without prefix; a SimMIM target's pixel decoder is ``decoder.*``."""

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
        parts = [(name, [k for k in self.loaded + self.missing if k.startswith(p)]) for name, p in _SIMMIM_PARTS]
        if parts[0][1]:  # a SimMIM model: say plainly whether its head came from the checkpoint
            said = [f"{name} {'taken from the checkpoint' if k[0] in self.loaded else 'newly initialised'}"
                    for name, k in parts if k]  # fmt: skip
            lines.append("  SimMIM: " + ", ".join(said))
        for name, keys in (("dropped (not used)", self.dropped), ("newly initialised", self.missing)):
            if keys:
                lines.append(f"  {name}: {len(keys)}: {', '.join(_summarise(keys))}")
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


_SIMMIM_PARTS = (("pixel decoder", "decoder."), ("mask token", "mask_token"))


def _summarise(keys: list[str], limit: int = 8) -> list[str]:
    """Group keys by their first two name parts (decoder.0.*) so reports stay short."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[g] = groups.get(g, 0) + 1
    out = [g if n == 1 else f"{g} ({n})" for g, n in groups.items()]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _likely_cause(key: str, weights: PretrainedWeights, model: Any) -> str:
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
    if key.startswith("decoder."):
        return "a different encoder stride or number of input channels of the pixel decoder"
    return "a different model configuration"


def _fit(
    own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], weights: PretrainedWeights, model: Any,
    strict_shapes: bool,
) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
    """The tensors of ``theirs`` that fit ``own`` and the keys that do not (raising under ``strict_shapes``)."""
    to_load: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in theirs.items():
        if k not in own:
            dropped.append(k)
        elif own[k].shape != v.shape:
            if strict_shapes and not k.startswith("head."):
                raise CheckpointError(
                    f"{weights.path}: {k} has shape {list(v.shape)} in the checkpoint but {list(own[k].shape)} in "
                    f"the model: {_likely_cause(k, weights, model)}"
                )
            dropped.append(k)
        else:
            to_load[k] = v
    return to_load, dropped


def load_pretrained(
    model: torch.nn.Module,
    path: str | Path | PretrainedWeights,
    strict_shapes: bool = True,
    trust_checkpoint: bool = False,
) -> LoadReport:
    """Load SwinV2 weights from ``path`` (anything :func:`read_pretrained` reads) into ``model``: an encoder, or a
    :class:`~simmim.models.simmim.SimMIM`, whose pixel decoder and mask token are loaded too when the checkpoint
    has them (continuing pretraining from an official, HF or our SimMIM checkpoint) and reported as newly
    initialised when it has not.

    Windows and resolutions may differ: the model rebuilds its position tables; build it with
    ``pretrained_window_sizes`` = the report's ``pretrained_window_sizes`` for the official transfer. A
    classification head of another shape (new ``num_classes``) is left newly initialised. With ``strict_shapes``
    any other shape mismatch, or blocks only one side has (different depths), raises :class:`CheckpointError`;
    without, such keys are left newly initialised and listed in the report."""
    weights = path if isinstance(path, PretrainedWeights) else read_pretrained(path, trust_checkpoint)
    encoder, decoder = (model.encoder, model.decoder) if hasattr(model, "decoder") else (model, None)
    own = encoder.state_dict()
    to_load, dropped = _fit(own, weights.state_dict, weights, encoder, strict_shapes)
    dropped = list(weights.dropped) + dropped
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
    theirs_decoder = {f"decoder.{k}": v for k, v in weights.decoder.items()}
    dec_load: dict[str, torch.Tensor] = {}
    if decoder is None:
        dropped += sorted(theirs_decoder)
    else:
        own_decoder = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
        dec_load, dec_dropped = _fit(own_decoder, theirs_decoder, weights, encoder, strict_shapes)
        dropped += dec_dropped
    missing = [k for k in own if k not in to_load]
    if decoder is not None:
        missing += [f"decoder.{k}" for k in decoder.state_dict() if f"decoder.{k}" not in dec_load]
    with torch.no_grad():
        encoder.load_state_dict(to_load, strict=False)
        if dec_load:
            decoder.load_state_dict({k[len("decoder.") :]: v for k, v in dec_load.items()}, strict=False)
    loaded = sorted(to_load) + sorted(dec_load)
    return LoadReport(weights.path, weights.source, loaded, sorted(dropped), missing, weights.window_sizes)


def _require_complete(report: LoadReport, what: str) -> None:
    if report.missing:
        missing = ", ".join(_summarise(report.missing, 4))
        raise CheckpointError(f"{report.path}: its weights do not make a whole {what}: missing {missing}")


def simmim_from_weights(weights: PretrainedWeights) -> torch.nn.Module:
    """The SimMIM model (eval mode) a checkpoint holds whole: encoder, mask token and pixel decoder, built from the
    config it records (``norm_target`` from its hyper-parameters). Raises when it lacks the decoder or a config."""
    from simmim.models.simmim import SimMIM, SwinTransformerV2ForSimMIM

    if not weights.decoder:
        raise CheckpointError(
            f"{weights.path} has no SimMIM pixel decoder ({weights.source} weights: an exported encoder?), so it "
            "cannot reconstruct: give the pretraining checkpoint (run_dir/checkpoints/last.ckpt)"
        )
    cfg = full_config(weights.config) if weights.config else None
    if cfg is None:
        raise CheckpointError(f"{weights.path} records no model config to rebuild its SimMIM model from")
    hp = weights.meta.get("hyper_parameters") or {}
    raw = dict(weights.config)
    norm_target = hp.get("norm_target", raw.get("norm_target", False))
    nt_patch = hp.get("norm_target_patch_size", raw.get("norm_target_patch_size", 47))
    cfg.pop("model", None)
    cfg.pop("num_classes", None)
    try:
        model = SimMIM(SwinTransformerV2ForSimMIM(**cfg), norm_target=norm_target, norm_target_patch_size=nt_patch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{weights.path}: cannot build the model from its model_config {cfg}: {e}") from e
    _require_complete(load_pretrained(model, weights), f"SimMIM {describe(cfg)}")
    return model.eval()


def model_from_weights(weights: PretrainedWeights) -> torch.nn.Module:
    """The encoder or classifier (eval mode) a checkpoint holds, built from its recorded config, else from the
    geometry of its weights (image and window size then default), and loaded whole."""
    head = weights.state_dict.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    cfg = dict(weights.config) if weights.config else geometry_of(weights.state_dict)
    try:
        model = build_encoder(cfg, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{weights.path}: cannot build the model from its config {cfg}: {e}") from e
    _require_complete(load_pretrained(model, weights), describe(geometry_of(weights.state_dict)))
    return model.eval()


_RESUME_EXPECT = "resume= takes a .ckpt a run wrote (run_dir/checkpoints/last.ckpt), or resume=auto with run_dir="


def check_resume(path: str | Path, model_config: Mapping[str, Any], kind: str | None = None) -> None:
    """Before Lightning loads ``path`` to resume a run of ``model_config`` (``name``/``model`` plus overrides):
    refuse, in one line that names the file and what to do, a file that is no checkpoint, a truncated one,
    weights without training state, a checkpoint of the other kind of run (``kind``: pretrain | finetune) or of
    another model geometry. The checkpoint is memory-mapped, so the check reads little of a large file."""
    weights = read_pretrained(path, expect=_RESUME_EXPECT)
    start = {"pretrain": "model.init_from", "finetune": "pretrained"}.get(kind or "", "model.init_from/pretrained")
    if weights.source != "lightning" or "global_step" not in weights.meta:
        raise CheckpointError(
            f"{path} holds {weights.source} weights but no training state: resume= continues a run from one of its "
            f"own checkpoints (run_dir/checkpoints/*.ckpt, or resume=auto); to start from these weights use "
            f"{start}={path}"
        )
    trained_by = weights.meta.get("trained_by")
    if kind is not None and trained_by is not None and trained_by != kind:
        raise CheckpointError(
            f"{path} is a {trained_by} checkpoint and this is a {kind} run: resume it with python -m "
            f"simmim.{trained_by}, or start from its weights with {start}={path}"
        )
    run = full_config(model_config)
    if run is None:  # an unknown model name: the run's own checks say so
        return
    ckpt = geometry_of(weights.state_dict)
    differ = [k for k in GEOMETRY if ckpt[k] != run[k]]
    if differ:
        name = weights.config.get("model") or model_name_for(ckpt)
        raise CheckpointError(
            f"{path} holds a {describe({**ckpt, 'model': name})} but this run builds a {describe(run)} (different "
            f"{', '.join(differ)}): resume with the checkpoint's model"
            + (f" (model.name={name})" if name else "")
            + ", or start a new run without resume="
        )
