"""DataLoader pieces: 8-bit batches normalised after the workers, shards downloaded ahead of them."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from simmim.data.datasets import SampleDataset
from simmim.data.sampler import EpochSampler
from simmim.data.shards import ShardPrefetcher

__all__ = ["NormalisingLoader", "PrefetchingSampler", "RawBatches", "check_cache_size", "limit_worker_threads"]


def limit_worker_threads(worker_id: int) -> None:
    cv2.setNumThreads(1)  # OpenCV's own thread pool in every worker oversubscribes the cores


def check_cache_size(source, window: int) -> None:
    """Warn when the shard cache cannot hold what one training process uses at a time: the ``window`` shards it
    reads, as many downloaded ahead, and one more."""
    largest = max((s for s in source.sizes if s), default=0)
    need = (2 * window + 1) * largest
    if largest and source.cache.limit < need:
        warnings.warn(
            f"data.cache_limit ({source.cache.limit} bytes) holds {source.cache.limit // largest} shards of "
            f"{source.root}, fewer than the {2 * window + 1} one training process uses at a time "
            f"(data.shard_window={window} read, as many downloaded ahead, one more): shards will be deleted and "
            f"downloaded again; raise data.cache_limit to at least {need} bytes per process on this machine",
            stacklevel=3,
        )


class PrefetchingSampler(torch.utils.data.Sampler):
    """The training sampler, with the shards its epoch will read downloaded ahead in this process (a background
    thread, ``ShardPrefetcher``); ``set_epoch`` and length pass through, and resume state stays in the
    ``EpochSampler`` (the data module's ``train_sampler``)."""

    def __init__(self, sampler: EpochSampler, dataset: SampleDataset, window: int) -> None:
        self.sampler, self.dataset = sampler, dataset
        self.drop_last, self.shuffle = sampler.drop_last, sampler.shuffle
        self.prefetcher = ShardPrefetcher(dataset.source, ahead=window)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        keys = list(self.sampler)
        positions = np.fromiter((k[0] for k in keys), np.int64, len(keys))
        shards = self.dataset.source.shard_of(self.dataset.indices[positions])
        return self.prefetcher.follow(keys, shards)

    def __len__(self) -> int:
        return len(self.sampler)


class RawBatches(torch.utils.data.Dataset):
    """A ``SampleDataset`` whose batched reads (``__getitems__``, what a DataLoader worker calls) give the
    transform's raw 8-bit images; single items (``dataset[i]``) stay normalised, as everywhere else."""

    def __init__(self, dataset: SampleDataset) -> None:
        self.dataset = dataset

    def __getitems__(self, keys) -> list[dict]:
        return [self.dataset.sample(key, raw=True) for key in keys]

    def __getitem__(self, key):
        return self.dataset[key]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class NormalisingLoader(DataLoader):
    """A DataLoader over :class:`RawBatches`: batches cross from the workers as 8-bit images (a quarter of the
    shared memory that float32 takes, and of its page faults: most of a worker's overhead per image) and are
    normalised here, bit for bit as per sample (``PretrainTransform.normalize``), so they are float32 as before.
    ``on_device``: leave them 8-bit; the data module's ``on_after_batch_transfer`` normalises them on the GPU."""

    def __init__(self, dataset: RawBatches, *args, on_device: bool = False, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.on_device = on_device

    def __iter__(self):
        batches = super().__iter__()
        if self.on_device:
            return batches
        return self._normalised(batches)

    def _normalised(self, batches):
        normalize = self.dataset.dataset.transform.normalize
        for batch in batches:
            if batch["image"].dtype == torch.uint8:
                batch["image"] = normalize(batch["image"], pin_memory=self.pin_memory)
            yield batch
