"""All the Lightning code: the modules (pretraining, fine-tuning, linear probing), their shared base, callbacks,
strategies (DDP, ZeRO, FSDP), optimisation and the Trainer of a run. Models import none of it."""

from simmim.training.classify import FinetuneModule, LinearProbeModule
from simmim.training.pretrain import SimMIMPretrainModule

__all__ = ["SimMIMPretrainModule", "FinetuneModule", "LinearProbeModule"]
