"""``python -m simmim.export SOURCE --to hf|timm|official|onnx --out FOLDER``: weights out to where users go next.

SOURCE is a pretraining or fine-tuning run folder, a ``.ckpt``, an ``encoder.safetensors`` (or any file or export
folder :func:`simmim.io.read_pretrained` reads). FOLDER receives the format's files and a model card (README.md):

- ``hf``: config.json, model.safetensors, preprocessor_config.json for ``transformers``: ``Swinv2Model`` (an
  encoder), ``Swinv2ForMaskedImageModeling`` (a SimMIM checkpoint: encoder, mask token, pixel decoder) or
  ``Swinv2ForImageClassification`` (a fine-tuned model; ``id2label`` from its class names);
- ``timm``: model.safetensors and a hub-style config.json (architecture, model_args, pretrained_cfg) that
  ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads strictly;
- ``official``: model.pth in the official layouts (SimMIM pretraining: ``model`` with ``encoder.*`` / ``decoder.*``;
  classification for encoders and fine-tuned models);
- ``onnx``: model.onnx, the encoder's features or the classifier's logits, batch size dynamic.

Every form but ONNX goes back in through ``pretrained=`` and ``model.init_from=``.
"""

from __future__ import annotations

from pathlib import Path

from simmim.export.source import ExportError, Source, read_source
from simmim.io import CheckpointError, save_text

__all__ = ["FORMATS", "ExportError", "Source", "export", "read_source"]

FORMATS = ("hf", "timm", "official", "onnx")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder (it is created)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ExportError(f"--out {out} already holds files ({shown}): give a new folder, or pass --overwrite")


def export(
    source: str | Path, to: str, out: str | Path, overwrite: bool = False, trust_checkpoint: bool = False
) -> Path:
    """Export ``source`` to ``to`` (one of :data:`FORMATS`) in the folder ``out``; returns the folder."""
    from simmim.export.card import model_card

    if to not in FORMATS:
        raise ExportError(f"--to {to!r} is not a format: use one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, overwrite)
    try:
        src = read_source(source, trust_checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if to == "onnx":
        from simmim.export.onnx import write_onnx as write
    else:
        from simmim.export import formats

        write = {"hf": formats.write_hf, "timm": formats.write_timm, "official": formats.write_official}[to]
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        files, usage, notes = write(src, out)
        save_text(model_card(src, to, [*files, "README.md"], usage, notes), out / "README.md")
    except BaseException:  # leave no half export: what this call wrote goes, a folder it made too
        written = set(out.iterdir()) - (before or set()) if out.is_dir() else set()
        for path in written:
            path.unlink()
        if before is None and out.is_dir():
            out.rmdir()
        raise
    return out
