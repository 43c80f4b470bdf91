"""Plain PyTorch models: the SwinV2 encoder, SimMIM, and state-dict converters. No Lightning, no files."""

from simmim.models.simmim import SimMIM, SwinTransformerV2ForSimMIM, build_simmim
from simmim.models.swinv2 import MODEL_CONFIGS, SwinTransformerV2, compile_model, create_model

__all__ = [
    "MODEL_CONFIGS",
    "SimMIM",
    "SwinTransformerV2",
    "SwinTransformerV2ForSimMIM",
    "build_simmim",
    "compile_model",
    "create_model",
]
