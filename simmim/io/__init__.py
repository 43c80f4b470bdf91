"""Checkpoint and file I/O, in one place: the atomic writer every file goes through (torch, safetensors, YAML, JSON)
and its stale-temporary clean-up (:mod:`simmim.io.files`), the reader of every checkpoint layout
(:mod:`simmim.io.read`), recorded model configs (:mod:`simmim.io.schema`), and loading weights into models, with
the resume pre-flight check (:mod:`simmim.io.load`)."""

from simmim.io.files import (
    atomic_write,
    encoder_provenance,
    load_encoder,
    remove_stale_temporaries,
    save_encoder,
    save_json,
    save_safetensors,
    save_text,
    save_torch,
    temporary_path,
)
from simmim.io.load import LoadReport, check_resume, load_pretrained, model_from_weights, simmim_from_weights
from simmim.io.read import CheckpointError, PretrainedWeights, checkpoint_in_folder, read_pretrained
from simmim.io.schema import build_encoder, full_config, geometry_of, model_name_for

__all__ = [
    "atomic_write",
    "build_encoder",
    "check_resume",
    "checkpoint_in_folder",
    "CheckpointError",
    "encoder_provenance",
    "full_config",
    "geometry_of",
    "load_encoder",
    "load_pretrained",
    "LoadReport",
    "model_from_weights",
    "model_name_for",
    "PretrainedWeights",
    "read_pretrained",
    "remove_stale_temporaries",
    "save_encoder",
    "save_json",
    "save_safetensors",
    "save_text",
    "save_torch",
    "simmim_from_weights",
    "temporary_path",
]
