"""Multi-process pretraining pieces: ZeRO stage 1 under DDP, one random stream per rank, and moving a data
position between runs with different numbers of processes.

* ZeRO stage 1 (``optim.zero=true``): the AdamW state is split over the DDP processes with
  :class:`torch.distributed.optim.ZeroRedundancyOptimizer` (the SwinV2 paper trains its largest models with ZeRO,
  section 3.4). Lightning consolidates the state on rank 0 before a checkpoint is written
  (``Strategy.optimizer_state`` calls ``consolidate_state_dict``), in the format of a plain AdamW over the same
  parameter groups (state keyed by the global parameter order), so a checkpoint from a sharded run resumes in a
  plain or sharded run with any number of processes.
* Drop path draws from the global torch generator: every rank gets its own stream (``seed + rank``, as the
  official code seeds each rank), and checkpoints keep every rank's generator state.
* The checkpoint's data position counts batches of ``batch_size x world size`` images; a run with another global
  batch skips the same number of images instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from simmim.data.sampler import EpochSampler
from simmim.errors import RecipeError

__all__ = [
    "build_strategy",
    "full_state_dict",
    "gather_rng_states",
    "rescale_position",
    "seed_rank",
    "shard_optimizer",
    "shard_train_sampler",
    "sharding_strategy",
]


def sharding_strategy(strategy: pl.strategies.Strategy) -> str | None:
    """The name of a strategy that shards parameters or optimizer state itself (FSDP, DeepSpeed), else None."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    for cls in (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy):
        if isinstance(strategy, cls):
            return cls.__name__
    return None


def shard_optimizer(optimizer: torch.optim.Optimizer, trainer: pl.Trainer) -> torch.optim.Optimizer:
    """ZeRO stage 1: ``optimizer`` (its class, defaults and parameter groups with their own lr / weight decay)
    rebuilt as a ``ZeroRedundancyOptimizer`` over the trainer's processes; unchanged with a single process."""
    from pytorch_lightning.strategies import DDPStrategy
    from torch.distributed.optim import ZeroRedundancyOptimizer

    strategy = trainer.strategy
    owner = sharding_strategy(strategy)
    if owner is not None:
        raise RecipeError(
            f"optim.zero=true shards AdamW across DDP processes, but trainer.strategy is {owner}, which shards "
            "optimizer state itself: drop optim.zero (or use trainer.strategy=ddp)"
        )
    if trainer.world_size == 1:
        rank_zero_info("optim.zero=true with a single process: nothing to shard, using the plain optimizer")
        return optimizer
    if not isinstance(strategy, DDPStrategy):
        raise RecipeError(f"optim.zero=true needs trainer.strategy=ddp (or ddp_spawn), got {type(strategy).__name__}")
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters  # defaults may hold more (AdamW: decoupled_weight_decay)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [dict(g) for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **defaults)


def build_strategy(name: Any) -> Any:
    """``trainer.strategy`` of a recipe: ``fsdp`` becomes an FSDPStrategy that shards each SwinV2 block (and patch
    merging) as its own unit, so a block's parameters are gathered only while it runs; other values go to Lightning
    as they are (``ddp``, ``deepspeed_stage_2``, ...)."""
    if name != "fsdp":
        return name
    from pytorch_lightning.strategies import FSDPStrategy

    from simmim.models.layers import PatchMerging
    from simmim.models.swinv2 import SwinTransformerBlock

    return FSDPStrategy(auto_wrap_policy={SwinTransformerBlock, PatchMerging}, state_dict_type="full")


def full_state_dict(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The module's whole state dict, on rank 0 at least. Sharded strategies gather it, so every process must
    call this; other strategies hold the whole module on every process."""
    if sharding_strategy(trainer.strategy) is None:
        return module.state_dict()
    return trainer.strategy.lightning_module_state_dict()


def shard_train_sampler(trainer: pl.Trainer) -> None:
    """Rebuild the datamodule's ``train_sampler`` for this process when it was built for another rank or world size
    (the train loader was read before the trainer existed, e.g. to pick images to visualise): every process would
    otherwise train on every image."""
    datamodule = trainer.datamodule
    sampler = getattr(datamodule, "train_sampler", None)
    here = (trainer.global_rank, trainer.world_size)
    if not isinstance(sampler, EpochSampler) or (sampler.rank, sampler.world_size) == here:
        return
    datamodule.train_sampler = EpochSampler(
        sampler.size,
        sampler.batch_size,
        shuffle=sampler.shuffle,
        drop_last=sampler.drop_last,
        seed=sampler.seed,
        size_notes=sampler.size_notes,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        groups=sampler.groups,  # shards: keep the shard-aware order
        window=sampler.window,
    )


def gather_rng_states(trainer: pl.Trainer) -> torch.Tensor:
    """Every rank's CPU generator state as a uint8 tensor [world size, n]. A collective: call it on all ranks
    (checkpoint hooks run on all of them)."""
    state = torch.get_rng_state()
    if trainer.world_size == 1:
        return state[None]
    state = state.to(trainer.strategy.root_device)  # NCCL gathers GPU tensors only
    rows = [torch.empty_like(state) for _ in range(trainer.world_size)]
    dist.all_gather(rows, state)
    return torch.stack(rows).cpu()


def seed_rank(trainer: pl.Trainer, saved: torch.Tensor | None = None) -> None:
    """Give this rank its random stream: its row of ``saved`` (:func:`gather_rng_states`, or a single state from a
    one-process checkpoint) when there is one, else ``initial seed + rank`` (rank 0 keeps the one-process
    stream). A no-op for a fresh single-process run."""
    rank = trainer.global_rank
    if saved is not None:
        rows = saved if saved.ndim == 2 else saved[None]
        if rank < len(rows):
            torch.set_rng_state(rows[rank].clone())  # a row of the stack is a view; the generator needs its own
            return
    if trainer.world_size > 1 or saved is not None:
        torch.manual_seed(torch.initial_seed() + rank)


def rescale_position(batches_done: int, saved_global_batch: int | None, global_batch: int) -> int:
    """Batches to skip in a resumed epoch so that the same images are skipped when the checkpoint was written
    with another global loader batch (``batch_size x world size``); warns when that is not a whole number."""
    if not saved_global_batch or saved_global_batch == global_batch:
        return batches_done
    images = batches_done * saved_global_batch
    done, extra = divmod(images, global_batch)
    message = (
        f"resuming with {global_batch} images per loader step over all processes where the checkpoint used "
        f"{saved_global_batch}: skipping the {done * global_batch} images already seen this epoch"
    )
    if extra:
        rank_zero_warn(f"{message}; {extra} of them are seen again")
    else:
        rank_zero_info(message)
    return done
