"""SimMIM self-supervised pretraining for Swin Transformer V2 on PyTorch and PyTorch Lightning."""

import os

# GNU OpenMP (PyTorch's CPU thread pool) busy-waits at every barrier by default. When another busy process shares
# the cores (a DataLoader worker, a second job), a descheduled thread holds all others up at each of the thousands
# of parallel regions of a step: we measured CPU training steps 20-50x slower (0.45 s -> 10-30 s). Passive waiting
# removes that; it must be set before torch loads libgomp, so import simmim before torch. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
