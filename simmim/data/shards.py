"""Shards: a dataset packed into webdataset tar files (``python -m simmim.data.pack``), read by sample index from a
local folder or streamed from object storage (s3://, gs://, http(s)://, any fsspec URL).

Layout of a shard folder (or URL prefix)::

    manifest.json       counts, classes, bytes, source; also a wids (webdataset's indexed reader) descriptor
    labels.npy          one label per sample, in shard order (labelled sources only)
    shard-000000.tar    samples 0 .. n0-1: members <key>.<ext> (the original encoded bytes) and <key>.cls
    shard-000001.tar    ...
    samples.tsv         key, label and original file of every sample (for people; never read here)

``ShardSource`` is a source like the folder ones (``len``, ``load``, ``pixels``, ``name``, ``labels``), so the seeded
``SampleDataset`` (per-sample augmentation, bad-file rule) and ``EpochSampler`` (rank sharding, exact resume) work
unchanged: sample ``i`` lives in the shard whose range holds ``i`` (from the manifest's counts, at start-up) at
offset ``i - start``. The sampler's shard-aware order (``EpochSampler(groups=...)``) keeps reads sequential-ish:
each rank reads a few shards at a time, shards permuted every epoch.

A local folder is read in place (memory-mapped by wids). From a URL, each shard is downloaded whole into
``cache_dir`` the first time a process on this machine needs it: one download per machine (a file lock per shard),
shared by DataLoader workers and DDP ranks, the least recently used shards deleted to stay within ``cache_limit``.
The main process downloads ahead along the epoch's order (``ShardPrefetcher``) so workers rarely wait.
Credentials and endpoints come from the usual environment (``AWS_*`` incl. ``AWS_ENDPOINT_URL`` for s3fs,
``GOOGLE_APPLICATION_CREDENTIALS`` for gcsfs); s3:// needs ``pip install s3fs``, gs:// ``pip install gcsfs``.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from simmim.data.errors import DataError
from simmim.data.images import BadImageError, decode_image, open_image
from simmim.data.storage import (
    DEFAULT_CACHE_DIR,
    ShardCache,
    exists,
    is_url,
    join_url,
    local_path,
    parse_size,
    read_bytes,
)

__all__ = ["FORMAT", "MANIFEST", "ShardPrefetcher", "ShardSource", "is_shard_root", "split_root"]

MANIFEST = "manifest.json"
FORMAT = "simmim-shards"


def is_shard_root(root: str | os.PathLike | None) -> bool:
    """True when ``root`` (a local folder) holds a shard manifest; URLs are checked by ``split_root``."""
    return root is not None and not is_url(root) and os.path.isfile(join_url(str(root), MANIFEST))


def split_root(root: str | os.PathLike, split: str) -> str | None:
    """``root/split`` when it holds a shard manifest (a packed ImageNet layout: train/, val/), else None."""
    candidate = join_url(str(root), split)
    return candidate if exists(join_url(candidate, MANIFEST)) else None


class ShardSource:
    """The samples of a shard folder or URL (see the module docstring), as a data source.

    ``cache_dir`` / ``cache_limit``: where shards from a URL are kept and the most bytes kept there (a local
    folder is read in place); ``open_shards``: shards each process keeps open (memory-mapped) at a time.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: str | int = "20GB",
        open_shards: int = 8,
    ) -> None:
        self.root = str(root)
        self.remote = is_url(self.root)
        url = join_url(self.root, MANIFEST)
        try:
            raw = read_bytes(url)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"data.root={self.root} holds no {MANIFEST}: with data.source=shards it must be a folder or URL "
                "written by `python -m simmim.data.pack SOURCE OUT` (or one holding such train/ and val/ folders)"
            ) from err
        except OSError as err:
            raise DataError(f"cannot read {url}: {type(err).__name__}: {err}") from err
        try:
            manifest = json.loads(raw)
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            shards = manifest["shardlist"]
            self.urls = [join_url(self.root, s["url"]) for s in shards]
            counts = np.array([int(s["nsamples"]) for s in shards], np.int64)
            self.sizes = [s.get("filesize") for s in shards]
            self.class_names = list(manifest.get("classes") or [])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{url} is not a shard manifest written by simmim.data.pack ({err}): re-run pack") from err
        self.manifest = manifest
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if manifest.get("labels"):
            labels = np.load(io.BytesIO(read_bytes(join_url(self.root, manifest["labels"]))), allow_pickle=False)
            if len(labels) != self.starts[-1]:
                raise DataError(f"{self.root}: {len(labels)} labels for {self.starts[-1]} samples: re-run pack")
            self.labels = labels.astype(np.int64)
        else:
            self.labels = np.full(int(self.starts[-1]), -1, np.int64)
        self.cache = None
        if self.remote:
            limit = parse_size(cache_limit)
            self.cache = ShardCache(cache_dir or DEFAULT_CACHE_DIR, limit)
            largest = max((s for s in self.sizes if s), default=0)
            if largest > limit:
                raise DataError(
                    f"data.cache_limit={cache_limit} is smaller than one shard of {self.root} ({largest} bytes): "
                    "raise data.cache_limit"
                )
        self.open_shards = open_shards
        self._open: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, index: np.ndarray | int) -> np.ndarray:
        """The shard number of each sample index."""
        return np.searchsorted(self.starts, index, side="right") - 1

    def group_sizes(self, indices: np.ndarray) -> list[int]:
        """Sizes of the runs of ``indices`` (sorted sample indices) that lie in the same shard: the ``groups`` of
        ``EpochSampler``."""
        if len(indices) and np.any(np.diff(indices) < 0):
            raise ValueError("group_sizes needs sorted indices")
        counts = np.bincount(self.shard_of(indices), minlength=len(self.urls))
        return [int(c) for c in counts if c]

    def name(self, index: int) -> str:
        shard = int(self.shard_of(index))
        return f"{self.urls[shard]}[{index - int(self.starts[shard])}]"

    def encoded(self, index: int) -> bytes:
        """Sample ``index``'s image file, as packed."""
        shard = int(self.shard_of(index))
        samples = self._shard(shard)
        reader = samples.reader  # wids' memory-mapped tar index: (name, header offset, size) per member
        for member in samples.samples[index - int(self.starts[shard])]:  # the sample's members (grouped by key)
            name, offset, size = reader.by_index[member]
            if not name.endswith(".cls"):
                return reader.mmapped_file[offset + 512 : offset + 512 + size]  # one copy, no header re-parse
        raise BadImageError(self.name(index), "the shard holds no image file for this sample")

    def pixels(
        self, index: int, min_size: Callable[[int, int], tuple[int, int]] | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        return decode_image(self.encoded(index), self.name(index), min_size=min_size)

    def load(self, index: int) -> Image.Image:
        return open_image(self.encoded(index), name=self.name(index))

    def local_path(self, shard: int) -> Path:
        """The shard's file on this machine (downloaded into the cache first for a URL)."""
        if self.cache is None:
            return Path(local_path(self.urls[shard]))
        return self.cache.fetch(self.urls[shard], self.sizes[shard])

    def _shard(self, shard: int):
        """The shard's indexed samples (wids), kept open (memory-mapped) in this process, LRU."""
        from wids.wids import IndexedTarSamples

        if self._pid != os.getpid():  # a forked DataLoader worker: the parent's maps are not ours to use
            self._open, self._pid = OrderedDict(), os.getpid()
        samples = self._open.get(shard)
        if samples is not None:
            self._open.move_to_end(shard)
            return samples
        path = self.local_path(shard)
        expected = int(self.starts[shard + 1] - self.starts[shard])
        try:
            samples = IndexedTarSamples(path=str(path))
        except Exception as err:  # a damaged tar: not one bad image but a broken dataset
            what = f"{type(err).__name__}: {err}"
            raise DataError(f"cannot index shard {self.urls[shard]} ({what}): re-run pack") from err
        if len(samples) != expected:
            samples.close()
            raise DataError(
                f"shard {self.urls[shard]} holds {len(samples)} samples, {MANIFEST} says {expected}: the shards and "
                "the manifest do not belong together; re-run pack"
            )
        self._open[shard] = samples
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1].close()
        return samples

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # memory maps do not travel to spawned workers; they reopen
        return state

    def __repr__(self) -> str:
        return f"ShardSource({self.root}, {len(self)} samples in {len(self.urls)} shards)"


class ShardPrefetcher:
    """Downloads a rank's shards ahead of its DataLoader workers, in the order it will read them.

    ``follow(keys, shards)`` wraps the sampler's keys for one epoch: ``shards[n]`` is the shard of the n-th key.
    A background thread downloads the distinct shards in order of first use, staying at most ``ahead`` shards in
    front of the one the keys have reached (the cache must hold them: see ``ShardSource``). A new epoch (or a
    resumed one) replaces the previous plan.
    """

    def __init__(self, source: ShardSource, ahead: int = 4) -> None:
        self.source, self.ahead = source, ahead
        self._lock = threading.Condition()
        self._plan: list[int] = []
        self._position = 0
        self._generation = 0
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None

    def follow(self, keys: Sequence, shards: np.ndarray) -> Iterator:
        if self.source.cache is None or not len(shards):
            yield from keys
            return
        change = np.flatnonzero(np.diff(shards) != 0) + 1
        starts = np.concatenate([[0], change])
        order, first = np.unique(shards[starts], return_index=True)
        plan = order[np.argsort(first)].tolist()  # distinct shards, in order of first use
        rank_of = {s: k for k, s in enumerate(plan)}
        self._start(plan)
        next_change, current = 0, -1
        for n, key in enumerate(keys):
            if next_change < len(starts) and n == starts[next_change]:
                reached = rank_of[int(shards[n])]
                if reached > current:
                    current = reached
                    with self._lock:
                        self._position = current
                        self._lock.notify_all()
                next_change += 1
            yield key

    def _start(self, plan: list[int]) -> None:
        with self._lock:
            self._generation += 1
            self._plan, self._position = plan, 0
            generation = self._generation
            self._lock.notify_all()
        self._thread = threading.Thread(target=self._run, args=(generation, plan), daemon=True, name="shards")
        self._thread.start()

    def _run(self, generation: int, plan: list[int]) -> None:
        for k, shard in enumerate(plan):
            with self._lock:
                while generation == self._generation and k > self._position + self.ahead:
                    self._lock.wait(timeout=1.0)
                if generation != self._generation:
                    return
            try:
                self.source.local_path(shard)
            except Exception as err:  # the worker that needs it will raise the same error with its sample
                self.error = err
                return
