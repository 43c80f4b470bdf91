"""SimMIM self-supervised pretraining for Swin Transformer V2 on PyTorch and PyTorch Lightning.

Importing simmim does nothing but define it: hardware choices are made on first use (:mod:`simmim.runtime`).
"""

__version__ = "0.2.0"
