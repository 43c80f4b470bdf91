"""A seeded, epoch-aware, rank-sharding sampler with exact mid-epoch resume."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from simmim.data.errors import DataError

__all__ = ["EpochSampler", "too_few_samples"]


def too_few_samples(size: int, batch_size: int, world_size: int, notes: Sequence[tuple[str, str]] = ()) -> str:
    """The message for a training set smaller than one batch per rank, naming the recipe keys that fix it.

    ``notes``: (why so few, what to change) pairs, e.g. ("data.label_fraction=0.2 kept 9 of 48 images",
    "raise data.label_fraction").
    """
    ranks = f"on each of {world_size} ranks" if world_size > 1 else "on one device"
    fits = size // world_size
    fixes = [f"lower data.batch_size to at most {fits}" if fits else "use fewer devices (trainer.devices)"]
    fixes += [fix for _, fix in notes] + ["add images"]
    why = "; ".join([f"data.batch_size={batch_size}", *(note for note, _ in notes)])
    images = "1 training image does" if size == 1 else f"{size} training images do"
    return (
        f"{images} not fill one batch of {batch_size} {ranks} ({why}), and incomplete training "
        f"batches are dropped: {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys for ``SampleDataset``: a permutation of ``range(size)`` drawn from
    (seed, epoch) when ``shuffle``, split across ranks by striding, the same number of batches on every rank.

    ``drop_last``: every rank gets ``size // (world_size * batch_size)`` full batches (the tail of the permutation,
    different every epoch, is dropped). Otherwise ranks are padded by wrapping around the permutation, as
    ``DistributedSampler`` does, and may end with one partial batch.

    ``rank`` / ``world_size`` default to torch.distributed's when it is initialised, else 0 / 1. Call
    ``set_epoch(epoch)`` before each epoch (Lightning does) and ``skip_batches(n)`` to start the *next* iteration at
    batch ``n`` (exact mid-epoch resume); ``len()`` is always the full epoch. ``size_notes``: why the set is this
    small, for the message when it cannot fill one batch (see :func:`too_few_samples`).

    ``groups`` (shards): sizes of the consecutive runs of indices stored together (indices ``0..g0-1`` in the first,
    and so on). With ``shuffle``, an epoch then permutes the groups, gives each rank one contiguous part of that
    sequence (ranks read different shards; a group on a boundary is split between two ranks) and shuffles the
    indices within windows of ``window`` consecutive groups: a rank reads about ``window`` shards at a time, each
    from start to end in a random order, and every epoch visits shards and their samples in a new order. Each
    sample keeps its (seed, epoch, index) randomness; what changes is only which samples share a batch. Exact
    resume needs the same world size and batch size (the parts of the ranks depend on both).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        size_notes: Sequence[tuple[str, str]] = (),
        groups: Sequence[int] | None = None,
        window: int = 4,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.shuffle, self.drop_last, self.seed = size, batch_size, shuffle, drop_last, seed
        self.size_notes = tuple(size_notes)
        if groups is not None:
            groups = np.asarray(groups, np.int64)
            if groups.sum() != size or (groups < 1).any():
                raise ValueError(
                    f"groups must be positive sizes summing to size={size}, got {len(groups)} summing to "
                    f"{int(groups.sum())}"
                )
        if window < 1:
            raise ValueError(f"window must be >= 1 group, got {window}")
        self.groups, self.window = groups, window
        if drop_last:
            self.num_batches = size // (self.world_size * batch_size)
            self.num_samples = self.num_batches * batch_size
            if self.num_batches == 0:
                raise DataError(too_few_samples(size, batch_size, self.world_size, size_notes))
        else:
            self.num_samples = math.ceil(size / self.world_size)
            self.num_batches = math.ceil(self.num_samples / batch_size)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, n: int) -> None:
        """Start the next iteration at batch ``n`` of the epoch (then back to full epochs)."""
        if not 0 <= n <= self.num_batches:
            raise ValueError(f"cannot skip {n} batches of an epoch of {self.num_batches}")
        self._skip = n

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, before any skip."""
        if self.groups is not None and self.shuffle:
            return self._group_indices()
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        total = self.num_samples * self.world_size
        order = order[:total] if self.drop_last else np.resize(order, total)  # np.resize repeats from the start
        return order[self.rank :: self.world_size]

    def _group_indices(self) -> np.ndarray:
        """The shard-aware order: groups permuted per (seed, epoch), a contiguous part per rank, indices shuffled
        within windows of ``window`` groups."""
        rng = np.random.default_rng([self.seed, self.epoch])
        sizes = self.groups
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        order = rng.permutation(len(sizes))
        group = np.repeat(order, sizes[order])  # the group of each position of the sequence
        sequence = np.arange(self.size) - np.repeat(np.cumsum(sizes[order]) - sizes[order], sizes[order])
        sequence += starts[group]
        total = self.num_samples * self.world_size
        if self.drop_last:
            sequence, group = sequence[:total], group[:total]
        else:
            sequence, group = np.resize(sequence, total), np.resize(group, total)
        part = slice(self.rank * self.num_samples, (self.rank + 1) * self.num_samples)
        mine, group = sequence[part], group[part]
        new_group = np.flatnonzero(np.diff(group) != 0) + 1
        windows = np.split(mine, new_group[self.window - 1 :: self.window])
        shuffle = np.random.default_rng([self.seed, self.epoch, 1, self.rank])
        return np.concatenate([shuffle.permutation(w) for w in windows])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._skip = self._skip * self.batch_size, 0
        epoch = self.epoch
        return iter([(int(i), epoch) for i in self.indices()[start:]])

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"EpochSampler(size={self.size}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, seed={self.seed}, rank={self.rank}, world_size={self.world_size}"
            + ("" if self.groups is None else f", groups={len(self.groups)}, window={self.window}")
            + ")"
        )
