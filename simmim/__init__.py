"""SimMIM self-supervised pretraining for Swin Transformer V2 on PyTorch and PyTorch Lightning."""

from simmim import runtime

runtime.prepare_process()  # passive OpenMP waiting, before torch loads (see simmim.runtime.prepare_process)

__version__ = "0.1.0"
