"""The ONNX format: the encoder's features (or the classifier's logits) through torch.onnx's dynamo exporter, batch
size dynamic, with our plain-PyTorch reference kernels (the exporter cannot translate the hand-written CPU ops),
checked against our model with onnxruntime on CPU when it is installed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simmim.export.source import ExportError, Source
from simmim.io import atomic_write, model_from_weights

__all__ = ["write_onnx", "ONNX_RTOL"]

ONNX_RTOL = 1e-4  # fp32 ONNX Runtime against our fp32 model: max |difference| / max |ours|


class _Features(nn.Module):
    """Images [B, 3, H, W] -> ``features`` [B, H/32, W/32, C] (normalised) and ``pooled`` [B, C]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.forward_features(x)
        return features, features.mean(dim=(1, 2))


def _check(data: bytes, model: nn.Module, x: torch.Tensor, names: list[str]) -> str:
    """Run the file with onnxruntime (CPU) on a batch of another size than the export's; say how close it is."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "not checked at export: onnxruntime is not installed"
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = max(float((torch.from_numpy(o) - r).abs().max() / r.abs().max()) for o, r in zip(outputs, ref))
    if worst > ONNX_RTOL:
        raise ExportError(f"the ONNX export differs from the model by {worst:.2e} (relative) in onnxruntime")
    return (f"checked at export with onnxruntime {ort.__version__} (CPU, fp32, batch {len(x)}): outputs "
            f"({', '.join(names)}) within {worst:.1e} of simmim's, relative to their largest value")  # fmt: skip


def _fold(model: object) -> None:
    """Constant folding and clean-up of the exported graph (what ONNX Runtime would otherwise warn about, e.g.
    CastLike of constants), without onnxscript's pattern-rewriting rules: on SwinV2-B those took ~60% of the
    exporter's time (``optimize=True``), for fusions ONNX Runtime makes itself when it loads the model."""
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer as optimizer

    optimizer.inline(model)
    for _ in range(2):
        changed = optimizer.fold_constants(model)  # (ONNX shape inference: the same graph here, twice the time)
        optimizer.remove_unused_nodes(model)
        if not changed:
            break
    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    passes.DeduplicateInitializersPass()(model)
    passes.CommonSubexpressionEliminationPass()(model)


def write_onnx(src: Source, out: Path) -> tuple[list[str], str, list[str]]:
    """model.onnx: ``pixel_values`` [batch, 3, H, W] -> ``features`` and ``pooled`` (encoder, SimMIM checkpoint:
    its encoder) or ``logits`` (classifier)."""
    from simmim import runtime

    model = model_from_weights(src.weights).float()
    names = ["logits"] if src.kind == "classifier" else ["features", "pooled"]
    module = model if src.kind == "classifier" else _Features(model)
    c, (h, w) = src.config["in_chans"], src.size
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, c, h, w, generator=g)
    try:
        with runtime.reference_kernels(), torch.no_grad():
            program = torch.onnx.export(
                module.eval(), (example,), dynamo=True, input_names=["pixel_values"], output_names=names,
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, optimize=False,
            )  # fmt: skip
        _fold(program.model)
    except ImportError as e:
        raise ExportError(f"--to onnx needs the onnx and onnxscript packages ({e}): pip install onnx onnxscript") from e
    data = program.model_proto.SerializeToString()
    atomic_write(out / "model.onnx", lambda tmp: Path(tmp).write_bytes(data))
    checked = _check(data, module.eval(), torch.randn(3, c, h, w, generator=g), names)  # our fast kernels
    outputs = ", ".join(names)
    usage = (
        "import numpy as np, onnxruntime as ort\n\n"
        f'session = ort.InferenceSession("{out / "model.onnx"}", providers=["CPUExecutionProvider"])\n'
        f"images = np.zeros((4, {c}, {h}, {w}), np.float32)  # normalised as in the table above\n"
        f'{outputs}{"," if len(names) == 1 else ""} = session.run(None, {{"pixel_values": images}})'
    )
    notes = [
        "batch size is dynamic; the image size is fixed at export",
        checked,
        "an inference graph: position biases and temperatures are folded into constants, so it is no way back into "
        "training (use the hf, timm or official export for that)",
    ]
    if src.kind == "simmim":
        notes.insert(0, "the encoder of a SimMIM checkpoint (features); the mask token and pixel decoder are not in it")
    return ["model.onnx"], usage, notes
