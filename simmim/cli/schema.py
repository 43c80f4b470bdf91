"""The recipe schema: every key of a pretraining or fine-tuning recipe, with its type.

OmegaConf checks the types when a recipe is composed (:mod:`simmim.cli.recipes`). Values and their comments live in
one place, ``recipes/<kind>/_base.yaml``; the dataclasses here hold no defaults (``MISSING``), so a key missing from
a base recipe is an error, not a silent second default. A section that both kinds have means the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

__all__ = ["PretrainRecipe", "FinetuneRecipe", "SCHEMAS", "GEOMETRY_KEYS"]

# Constructor geometry a recipe may set on top of a named model config (null: the named config's value).
GEOMETRY_KEYS = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias", "pretrained_window_sizes")


@dataclass
class ModelSection:
    name: str = MISSING
    img_size: int = MISSING
    window_size: int = MISSING
    drop_path_rate: float = MISSING
    use_checkpoint: bool = MISSING
    attn_chunk_size: int = MISSING
    patch_size: int | None = MISSING
    embed_dim: int | None = MISSING
    depths: list[int] | None = MISSING
    num_heads: list[int] | None = MISSING
    mlp_ratio: float | None = MISSING
    qkv_bias: bool | None = MISSING
    pretrained_window_sizes: list[int] | None = MISSING


@dataclass
class PretrainModelSection(ModelSection):
    norm_target: bool = MISSING
    norm_target_patch_size: int = MISSING
    init_from: str | None = MISSING


@dataclass
class DataSection:
    root: str | None = MISSING
    source: str = MISSING
    val_root: str | None = MISSING
    val_fraction: float = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    crop_scale: list[float] = MISSING
    max_bad_files: int = MISSING
    cache_dir: str | None = MISSING
    cache_limit: str = MISSING
    shard_window: int = MISSING


@dataclass
class PretrainDataSection(DataSection):
    mask_patch_size: int = MISSING
    mask_ratio: float = MISSING
    crop_ratio: list[float] = MISSING


@dataclass
class FinetuneDataSection(DataSection):
    test_root: str | None = MISSING
    label_fraction: float = MISSING
    rand_augment_ops: int = MISSING
    rand_augment_magnitude: float = MISSING
    random_erasing: float = MISSING
    eval_resize_ratio: float = MISSING


@dataclass
class OptimSection:
    name: str = MISSING
    lr: float = MISSING
    warmup_lr: float = MISSING
    min_lr: float = MISSING
    weight_decay: float = MISSING
    layer_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    momentum: float = MISSING
    official_wd_exemption_bug: bool = MISSING
    zero: bool = MISSING


@dataclass
class ScheduleSection:
    name: str = MISSING
    epochs: float = MISSING
    steps: int | None = MISSING
    warmup_epochs: float = MISSING
    milestones: list[float] = MISSING
    gamma: float = MISSING


@dataclass
class CheckpointSection:
    every_n_steps: int = MISSING
    keep_all: bool = MISSING


@dataclass
class KnnSection:
    k: int = MISSING
    temperature: float = MISSING
    batch_size: int = MISSING


@dataclass
class KnnMonitorSection(KnnSection):
    root: str | None = MISSING
    every_n_epochs: int = MISSING
    label_fraction: float = MISSING


@dataclass
class MixupSection:
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    switch_prob: float = MISSING
    prob: float = MISSING
    label_smoothing: float = MISSING


@dataclass
class RunSection:
    """Keys every recipe has: hardware, run folder, resume, safety."""

    trainer: dict[str, Any] = field(default_factory=dict)  # any Lightning Trainer argument (checked by name)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logger: list[str] = MISSING
    memory: str = MISSING
    compile: bool = MISSING
    compile_mode: str = MISSING
    threads: Any = MISSING  # auto or a number
    seed: int = MISSING
    nan_policy: str = MISSING
    output_dir: str = MISSING
    name: str | None = MISSING
    run_dir: str | None = MISSING
    resume: str | None = MISSING
    recipe: str = "?"  # set by the loader: the recipe's name


@dataclass
class PretrainRecipe(RunSection):
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    knn: KnnMonitorSection = field(default_factory=KnnMonitorSection)
    reconstructions: int = MISSING
    visualize_every_n_steps: int = MISSING


@dataclass
class FinetuneRecipe(RunSection):
    mode: str = MISSING
    pretrained: str | None = MISSING
    trust_checkpoint: bool = MISSING
    model: ModelSection = field(default_factory=ModelSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    mixup: MixupSection = field(default_factory=MixupSection)
    knn: KnnSection = field(default_factory=KnnSection)


SCHEMAS: dict[str, type] = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}
