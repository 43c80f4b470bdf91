"""``memory=auto``: pick activation checkpointing and sequential attention from the model, the input size, the
batch and the memory available, and say why in the log.

The estimate (bytes, per process) is deliberately simple; it was fitted on the bytes PyTorch saves for the backward
pass of SwinV2 blocks (within about 10%, float32 and bfloat16 autocast), and errs high on GPUs, where fused
attention kernels keep no attention probabilities:

* A block of stage i, with ``T = B x Hp x Wp`` tokens (the stage's grid padded to whole windows), C channels, h
  heads, windows of N tokens and nW windows per image, keeps
  ``s x (T x (21 C + h N) + nW x h x N^2)`` bytes: 21 C-wide values per token (the input, q/k/v, normalised q/k,
  attention output, projection, the two norms and residual sums, the 4C MLP hidden layer before and after GELU),
  the h N attention probabilities per token, and the position bias plus shift mask of one image's windows.
  ``s`` is 2 bytes under 16-bit mixed precision, 4 in float32.
* Per-block checkpointing keeps only each block's float32 input (``4 T C`` bytes) and recomputes one block at a
  time in the backward pass; sequential attention over chunks of k (window, head) pairs replaces the attention
  terms by the ``3 s k N^2`` bytes of one chunk.
* Fixed: float32 weights and gradients (8 bytes / parameter), AdamW moments (8 bytes / parameter, divided by the
  world size under ZeRO) and, under mixed precision, 16-bit weight copies (2 bytes / parameter); plus ten float32
  image-sized tensors for the pixel head and the loss.
* Peak = fixed + saved activations + one block's activations (the block being worked on in the backward pass).

The plan takes the cheapest option whose peak fits ``fraction`` (0.6) of the available memory: nothing, then
checkpointing, then checkpointing with the largest power-of-two attention chunk that fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from simmim.models.registry import stage_windows

__all__ = [
    "train_gflop_per_image",
    "BlockGeometry",
    "MemoryPlan",
    "block_geometry",
    "available_memory",
    "plan_memory",
    "MemoryPlanner",
]

GIB = 2**30
FRACTION = 0.6  # of the available memory; the rest covers allocator fragmentation, workspaces and data loading


@dataclass(frozen=True)
class BlockGeometry:
    """One transformer block at a given batch: tokens T (padded to windows), channels, heads, window tokens N,
    windows per image."""

    tokens: int
    channels: int
    heads: int
    window_tokens: int
    windows: int

    def activation_bytes(self, s: int, chunk: int = 0) -> int:
        """Bytes this block keeps for the backward pass (``chunk`` > 0: sequential attention)."""
        n = self.window_tokens
        if chunk:
            attn = 3 * s * chunk * n * n
        else:
            attn = s * self.heads * n * (self.tokens + self.windows * n)
        return s * self.tokens * 21 * self.channels + attn

    @property
    def pairs_per_image(self) -> int:
        return self.windows * self.heads


def block_geometry(model_config: Mapping[str, Any], img_size: int, batch_size: int) -> list[BlockGeometry]:
    """Every block of a SwinV2 ``model_config`` (``embed_dim``, ``depths``, ``num_heads``, ``window_size``,
    ``patch_size``) at ``img_size`` and ``batch_size``; stages no larger than the window attend globally."""
    embed, depths, heads = model_config["embed_dim"], model_config["depths"], model_config["num_heads"]
    window, patch = model_config.get("window_size", 7), model_config.get("patch_size", 4)
    grid = math.ceil(img_size / patch)
    windows = stage_windows(img_size, window, patch, len(depths))
    blocks = []
    for i, (depth, h) in enumerate(zip(depths, heads)):
        res = math.ceil(grid / 2**i)
        w = windows[i]
        padded = math.ceil(res / w) * w
        geo = BlockGeometry(batch_size * padded**2, embed * 2**i, h, w * w, (padded // w) ** 2)
        blocks += [geo] * depth
    return blocks


def train_gflop_per_image(model_config: Mapping[str, Any], img_size: int) -> float:
    """Matrix-product GFLOP of one training step per image (3x the forward: the backward does two products for
    each forward one): per block 24 T C^2 (qkv, projection, 4C MLP) + 4 T N C (attention), per patch merging
    4 T C^2, for T tokens of C channels and windows of N tokens."""
    blocks = block_geometry(model_config, img_size, 1)
    forward = sum(24 * b.tokens * b.channels**2 + 4 * b.tokens * b.window_tokens * b.channels for b in blocks)
    embed, depths = model_config["embed_dim"], model_config["depths"]
    grid = math.ceil(img_size / model_config.get("patch_size", 4))
    for i in range(len(depths) - 1):
        forward += 4 * math.ceil(grid / 2**i) ** 2 * (embed * 2**i) ** 2
    return 3 * forward / 1e9


def _element_size(precision: str | int) -> int:
    p = str(precision)
    if p.startswith(("16", "bf16")):
        return 2
    return 8 if p.startswith("64") else 4


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The switches chosen and the numbers behind them (bytes)."""

    use_checkpoint: bool
    attn_chunk_size: int
    peak: int
    plain_peak: int
    available: int
    fits: bool
    message: str


def _peak(blocks: Sequence[BlockGeometry], fixed: int, s: int, checkpoint: bool, chunk: int) -> int:
    work = max(b.activation_bytes(s, chunk) for b in blocks)
    saved = sum(4 * b.tokens * b.channels if checkpoint else b.activation_bytes(s, chunk) for b in blocks)
    return fixed + saved + work


def plan_memory(
    model_config: Mapping[str, Any],
    img_size: int,
    batch_size: int,
    precision: str | int,
    available: int,
    num_params: int,
    zero_world_size: int = 1,
    fraction: float = FRACTION,
) -> MemoryPlan:
    """Choose activation checkpointing and an attention chunk size so that the estimated peak (module docstring)
    stays under ``fraction x available`` bytes."""
    blocks = block_geometry(model_config, img_size, batch_size)
    s = _element_size(precision)
    mixed = "mixed" in str(precision)
    fixed = num_params * (8 + 8 / zero_world_size + (2 if mixed else 0)) + 10 * 4 * batch_size * 3 * img_size**2
    fixed = int(fixed)
    budget = fraction * available
    plain = _peak(blocks, fixed, s, False, 0)
    what = (
        f"{model_config.get('model', 'model')} at {img_size} px, batch {batch_size} per process, "
        f"{'16-bit' if s == 2 else f'{8 * s}-bit'} activations"
    )
    head = f"memory=auto: est. {_fmt(plain)} peak for {what}"
    limit = f"{fraction:g} x {_fmt(available)} available"
    if plain <= budget:
        msg = f"{head} <= {limit} -> no checkpointing, full attention"
        return MemoryPlan(False, 0, plain, plain, available, True, msg)
    peak = _peak(blocks, fixed, s, True, 0)
    if peak <= budget:
        msg = f"{head} > {limit} -> checkpointing on ({_fmt(peak)}), full attention"
        return MemoryPlan(True, 0, peak, plain, available, True, msg)
    chunk = 2 ** int(math.log2(max(b.pairs_per_image for b in blocks)))
    while chunk > 1 and _peak(blocks, fixed, s, True, chunk) > budget:
        chunk //= 2
    peak = _peak(blocks, fixed, s, True, chunk)
    fits = peak <= budget
    msg = f"{head} > {limit} -> checkpointing on, attn_chunk_size={chunk} ({_fmt(peak)})"
    if not fits:
        msg += "; still over budget: lower data.batch_size or use more processes with optim.zero=true"
    return MemoryPlan(True, chunk, peak, plain, available, fits, msg)


def available_memory(device: torch.device, processes: int = 1) -> int:
    """Free bytes for one process: free GPU memory on ``device``; on CPU, MemAvailable from /proc/meminfo (psutil
    elsewhere) shared by the ``processes`` of this machine."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        free = info["MemAvailable"]
    except (OSError, KeyError):
        import psutil

        free = psutil.virtual_memory().available
    return free // max(1, processes)


class MemoryPlanner(pl.Callback):
    """Plans (:func:`plan_memory`) on rank 0 at setup, before the model is wrapped or moved, broadcasts the plan
    so that every process runs the same switches, applies it to the SimMIM encoder and logs one line.

    ``available``: bytes to plan for (e.g. another machine's); None measures this process's device.
    """

    def __init__(self, available: int | None = None, fraction: float = FRACTION) -> None:
        self.available = available
        self.fraction = fraction
        self.plan: MemoryPlan | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from simmim.eval import find_encoder

        encoder = find_encoder(pl_module)
        plan = None
        if trainer.is_global_zero:
            device = trainer.strategy.root_device
            processes = trainer.num_devices if device.type == "cpu" else 1
            available = self.available if self.available is not None else available_memory(device, processes)
            batch = pl_module.hparams.get("batch_size") or trainer.datamodule.batch_size
            zero = trainer.world_size if pl_module.hparams.get("optim", {}).get("zero") else 1
            plan = plan_memory(
                pl_module.hparams.model_config,
                encoder.img_size[0],
                int(batch),
                trainer.precision,
                available,
                sum(p.numel() for p in pl_module.parameters()),
                zero_world_size=zero,
                fraction=self.fraction,
            )
        plan = trainer.strategy.broadcast(plan)
        (rank_zero_info if plan.fits else rank_zero_warn)(plan.message)
        encoder.set_grad_checkpointing(plan.use_checkpoint)
        encoder.set_attn_chunk_size(plan.attn_chunk_size)
        self.plan = plan
