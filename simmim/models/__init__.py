"""Plain PyTorch models, no Lightning, no files: the SwinV2 encoder and SimMIM.

- :mod:`~simmim.models.layers`: DropPath, Mlp, patch embedding and merging, Log-CPB tables, windows and their masks,
  the effective-window rule;
- :mod:`~simmim.models.attention`: the scaled cosine window attention (paper eqs. 2-4);
- :mod:`~simmim.models.swinv2`: blocks, stages, the model;
- :mod:`~simmim.models.registry`: named configurations, ``create_model``, ``compile_model``, the saved encoder config;
- :mod:`~simmim.models.simmim` and :mod:`~simmim.models.targets`: SimMIM, its targets (NORM_TARGET) and loss;
- :mod:`~simmim.models.convert`: official <-> timm <-> HF state-dict mappings.
"""

from simmim.models.registry import MODEL_CONFIGS, compile_model, create_model
from simmim.models.simmim import SimMIM, SwinTransformerV2ForSimMIM, build_simmim
from simmim.models.swinv2 import SwinTransformerV2

__all__ = [
    "MODEL_CONFIGS",
    "SimMIM",
    "SwinTransformerV2",
    "SwinTransformerV2ForSimMIM",
    "build_simmim",
    "compile_model",
    "create_model",
]
