"""LightningDataModules for SimMIM pretraining (images + masks) and classification (images + labels).

Batches are dicts: ``image`` float32 [B,3,H,W] (normalised with ``mean``/``std``, ImageNet's by default, also for
Fashion-MNIST so that ImageNet-pretrained weights see familiar statistics), ``label`` int64 [B] (-1 when
unlabelled) and, for pretraining, ``mask`` int64 [B,H/p,W/p] (1 = masked, p = model patch size).

``batch_size`` is per process (the official code's total batch is batch_size x world size). Sources are scanned in
the constructor, so a wrong or empty root fails before any model is built. The training sampler (an
``EpochSampler``, created in ``setup``) shards across ranks itself: use ``Trainer(use_distributed_sampler=False)``.

Shards (``source="shards"``, or ``auto`` for a URL or a folder holding ``manifest.json``; see ``simmim.data.shards``)
train with the sampler's shard-aware order (``shard_window`` shards mixed at a time per rank); from a URL they are
cached in ``cache_dir`` within ``cache_limit`` and downloaded ahead of the workers. ``listing_cache``: a folder (the
run folder) where folder listings are kept, so a resume or another rank does not scan the tree again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from simmim.data.datasets import SampleDataset, build_source, detect_source
from simmim.data.fashion_mnist import FashionMNIST
from simmim.data.loading import (
    NormalisingLoader,
    PrefetchingSampler,
    RawBatches,
    check_cache_size,
    limit_worker_threads,
)
from simmim.data.sampler import EpochSampler
from simmim.data.splits import (
    Root,
    check_split,
    held_out,
    label_subset,
    require_labels,
    split_indices,
    subfolder,
    train_folder,
    val_folder,
)
from simmim.data.transforms import (
    EVAL_RESIZE_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainTransform,
    SampleTransform,
    eval_transform,
    finetune_transform,
)
from simmim.masking import MaskGenerator

__all__ = ["ClassificationDataModule", "PretrainDataModule"]


class _DataModule(pl.LightningDataModule):
    """Loader plumbing shared by both modules: rank discovery, samplers, worker settings, bad-file counts.

    Both modules pass ``**loading`` here: ``rank``/``world_size`` (None: the trainer's), ``listing_cache``,
    ``cache_dir``, ``cache_limit`` and ``shard_window`` (see the module docstring)."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        max_bad_files: int,
        rank: int | None = None,
        world_size: int | None = None,
        listing_cache: Root = None,
        cache_dir: Root = None,
        cache_limit: str | int = "20GB",
        shard_window: int = 4,
    ) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.seed, self.max_bad_files = seed, max_bad_files
        self.rank, self.world_size = rank, world_size
        self.listing_cache, self.shard_window = listing_cache, shard_window
        self.shard_options = {"cache_dir": cache_dir, "cache_limit": cache_limit, "open_shards": shard_window + 2}
        self.train_set: SampleDataset | None = None
        self.val_set: SampleDataset | None = None
        self.train_sampler: EpochSampler | None = None
        # why the training set is smaller than the source, with the key that changes it (for "too few images")
        self.size_notes: list[tuple[str, str]] = []

    def _dataset(
        self, source, transform, indices=None, fixed_epoch: int | None = None, split: str = "training"
    ) -> SampleDataset:
        return SampleDataset(source, transform, self.seed, indices, self.max_bad_files, fixed_epoch, split)

    def _build(self, root: Root, source: str, train: bool = True):
        """``build_source`` with this module's listing cache and shard cache settings."""
        return build_source(root, source, train, self.listing_cache, self.shard_options)

    def _sampler(self, dataset: SampleDataset, train: bool) -> EpochSampler:
        trainer = self.trainer
        rank = self.rank if self.rank is not None or trainer is None else trainer.global_rank
        world_size = self.world_size if self.world_size is not None or trainer is None else trainer.world_size
        shards = train and hasattr(dataset.source, "group_sizes")
        return EpochSampler(
            len(dataset),
            self.batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            size_notes=self.size_notes if train else (),
            groups=dataset.source.group_sizes(dataset.indices) if shards else None,
            window=self.shard_window,
        )

    def _loader(self, dataset: SampleDataset | None, sampler: EpochSampler | None = None) -> DataLoader | list:
        if dataset is None:
            return []  # Lightning skips a stage whose loader list is empty
        if sampler is None:
            sampler = self._sampler(dataset, train=False)
        if self.num_workers > 0:
            # The workers' cv2.setNumThreads(1) (limit_worker_threads) blocks forever in a worker forked while this
            # process's OpenCV pool is alive (e.g. after transforms ran here): the child inherits the pool's
            # condition variables with waiters that do not exist. One OpenCV thread here leaves no pool to copy;
            # this process does little OpenCV work once workers load the data.
            cv2.setNumThreads(1)
        if getattr(dataset.source, "cache", None) is not None and sampler.shuffle:
            check_cache_size(dataset.source, self.shard_window)
            sampler = PrefetchingSampler(sampler, dataset, self.shard_window)
        loader, extra = DataLoader, {}
        if hasattr(dataset.transform, "raw"):  # 8-bit images cross from the workers, normalised per batch
            loader, extra = NormalisingLoader, {"on_device": self._trainer_device() not in (None, "cpu")}
            dataset = RawBatches(dataset)
        return loader(
            dataset,
            **extra,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=limit_worker_threads if self.num_workers > 0 else None,
        )

    def _trainer_device(self) -> str | None:
        """The device type the attached trainer trains on (None without a trainer)."""
        try:
            return self.trainer.strategy.root_device.type if self.trainer is not None else None
        except (AttributeError, RuntimeError):
            return None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise 8-bit images on the training device (the loaders leave them 8-bit when it is not the CPU)."""
        image = batch.get("image") if isinstance(batch, dict) else None
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and self.train_set is not None:
            batch["image"] = self.train_set.transform.normalize(image)
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.train_sampler is None:
            self.setup("fit")
        return self._loader(self.train_set, self.train_sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.val_set)

    @property
    def num_bad_files(self) -> int:
        """Unreadable files met so far (all workers, train + val)."""
        return sum(d.num_bad_files for d in (self.train_set, self.val_set) if d is not None)


class PretrainDataModule(_DataModule):
    """Images and SimMIM masks for pretraining; see ``simmim.data`` for the layouts ``root`` may have.

    A root holding a ``train`` subfolder (e.g. ImageNet or Imagenette) trains on ``root/train``. Validation (loss
    on held-out images, same augmentation but with crops and masks fixed per image so losses compare across
    steps) comes from ``val_root`` (for Fashion-MNIST: the test split) or a ``val_fraction`` of the training set.
    ``val_root="auto"`` (the default) follows the root: ``root/val`` when the root holds both ``train`` and ``val``
    (``val_fraction`` then unused), else no validation folder; ``None``: no validation folder.
    """

    def __init__(
        self,
        root: Root = None,
        source: str = "auto",
        img_size: int = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        val_root: Root = "auto",
        val_fraction: float = 0.0,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_bad_files: int = 100,
        seed: int = 0,
        **loading: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed, max_bad_files, **loading)
        self.save_hyperparameters()
        if str(val_root) == "auto":
            val_root = val_folder(root, source)
            if val_root is not None:  # a val/ folder beside train/ is the validation set: nothing held out
                val_fraction = 0.0
        elif val_root is not None and val_fraction:
            raise ValueError(
                f"give data.val_root={val_root} or data.val_fraction={val_fraction}, not both: set the other one to "
                "null / 0"
            )
        self.mask_generator = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
        self.transform = PretrainTransform(img_size, crop_scale, crop_ratio, mean, std, self.mask_generator)
        self.source = self._build(train_folder(root, source), source)
        self.val_source = None if val_root is None else self._build(val_root, source, train=False)
        self.train_indices, self.val_indices = split_indices(len(self.source), val_fraction, seed)
        check_split(len(self.source), val_fraction)
        if val_fraction:
            self.size_notes.append(held_out(val_fraction, len(self.val_indices), len(self.source)))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._dataset(self.source, self.transform, self.train_indices)
        if self.val_source is not None:
            self.val_set = self._dataset(self.val_source, self.transform, fixed_epoch=0, split="validation")
        elif len(self.val_indices):
            self.val_set = self._dataset(
                self.source, self.transform, self.val_indices, fixed_epoch=0, split="validation"
            )
        self.train_sampler = self._sampler(self.train_set, train=True)


class ClassificationDataModule(_DataModule):
    """Images and labels for fine-tuning / linear probing: train / val / test sets.

    ImageFolder-style data: ``train_root`` defaults to ``root/train`` (or ``root`` itself when it has no ``train``
    folder), ``val_root`` to ``root/val``, ``test_root`` to ``root/test``, else the validation set; without any
    validation folder, ``val_fraction`` of the training images is held out. Fashion-MNIST (``root=None`` or
    ``"fashion_mnist"``): train on the 60k training images, validate and test on the 10k test images (or hold
    out ``val_fraction`` of the training images for validation).

    ``label_fraction`` < 1 keeps a class-balanced, deterministic subset of the training labels
    (label-efficiency experiments). ``num_classes`` and ``class_names`` are known after construction.
    """

    def __init__(
        self,
        root: Root = None,
        source: str = "auto",
        train_root: Root = None,
        val_root: Root = None,
        test_root: Root = None,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        label_fraction: float = 1.0,
        val_fraction: float = 0.0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        rand_augment_ops: int = 2,
        rand_augment_magnitude: float = 9,
        random_erasing: float = 0.25,
        eval_resize_ratio: float = EVAL_RESIZE_RATIO,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_bad_files: int = 100,
        seed: int = 0,
        **loading: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed, max_bad_files, **loading)
        self.save_hyperparameters()
        self.train_transform = SampleTransform(
            finetune_transform(
                img_size, crop_scale, rand_augment_ops, rand_augment_magnitude, random_erasing, mean, std
            )
        )
        self.eval_transform = SampleTransform(eval_transform(img_size, eval_resize_ratio, mean, std))
        fashion = (source == "auto" and train_root is None and detect_source(root) == "fashion_mnist") or (
            source == "fashion_mnist"
        )
        if fashion:
            folder = None if root is None or str(root) == "fashion_mnist" else root
            self.source = FashionMNIST(folder, train=True)
            test = FashionMNIST(folder, train=False)
            self.val_source, self.test_source = (None, test) if val_fraction else (test, test)
        else:
            self.source = self._build(train_root or train_folder(root, source), source)
            require_labels(self.source, train_root or root)
            val_root = val_root or subfolder(root, "val")
            self.val_source = None if val_root is None else self._build(val_root, source)
            test_root = test_root or subfolder(root, "test")
            self.test_source = self.val_source if test_root is None else self._build(test_root, source)
            if self.val_source is not None and val_fraction:
                raise ValueError(f"give a validation folder ({val_root}) or val_fraction ({val_fraction}), not both")
            if self.val_source is None and not val_fraction:
                raise ValueError(
                    f"no validation images for {train_root or root}: pass val_root, create {Path(str(root)) / 'val'}, "
                    "or hold out part of the training set with val_fraction"
                )
        self.class_names: list[str] = self.source.class_names
        self.num_classes = len(self.class_names)
        train_indices, self.val_indices = split_indices(len(self.source), val_fraction, seed)
        check_split(len(self.source), val_fraction)
        self.train_indices = train_indices[label_subset(self.source.labels[train_indices], label_fraction, seed)]
        if val_fraction:
            self.size_notes.append(held_out(val_fraction, len(self.val_indices), len(self.source)))
        if len(self.train_indices) < len(train_indices):
            self.size_notes.append(
                (
                    f"data.label_fraction={label_fraction} kept {len(self.train_indices)} of {len(train_indices)} "
                    "images",
                    "raise data.label_fraction",
                )
            )
        self.test_set: SampleDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset(self.source, self.train_transform, self.train_indices)
            if self.val_source is None:
                self.val_set = self._dataset(self.source, self.eval_transform, self.val_indices, split="validation")
            else:
                self.val_set = self._dataset(self.val_source, self.eval_transform, split="validation")
            same = self.test_source is None or self.test_source is self.val_source
            self.test_set = self.val_set if same else self._dataset(self.test_source, self.eval_transform, split="test")
        if self.train_sampler is None and stage in (None, "fit"):  # evaluation alone (kNN) needs no full batch
            self.train_sampler = self._sampler(self.train_set, train=True)

    def test_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("test")
        return self._loader(self.test_set)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images (after ``label_fraction``) with the evaluation transform, in order and sharded like
        validation: features for a kNN memory bank or a linear probe."""
        return self._loader(self._dataset(self.source, self.eval_transform, self.train_indices))
