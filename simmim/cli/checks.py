"""Every value check of a recipe, run when it is loaded: before any run folder, model or data exists.

Types are the schema's (OmegaConf); here: ranges, choices and geometry, each refusal one line naming the key, its
value and what to do instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from simmim.cli.schema import GEOMETRY_KEYS
from simmim.errors import RecipeError

__all__ = ["check_recipe", "model_config", "model_geometry", "LOGGERS"]

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

Rule = tuple[Callable[[Any], bool], str]


def _at_least(low: float, meaning: str = "") -> Rule:
    return (lambda v: v >= low), f"must be >= {low:g}" + (f" ({meaning})" if meaning else "")


def _within(low: float, high: float, meaning: str = "", open_high: bool = True) -> Rule:
    bracket = ")" if open_high else "]"
    test = (lambda v: low <= v < high) if open_high else (lambda v: low <= v <= high)
    return test, f"must lie in [{low:g}, {high:g}{bracket}" + (f" ({meaning})" if meaning else "")


_POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
_FRACTION: Rule = (lambda v: 0 < v <= 1, "must lie in (0, 1]")

# key -> rule, for every recipe that has the key
RULES: dict[str, Rule] = {
    "model.img_size": _at_least(1, "pixels"),
    "model.window_size": _at_least(1, "tokens"),
    "model.drop_path_rate": _within(0, 1, "stochastic depth: 0 off, the paper uses 0.1-0.2"),
    "model.attn_chunk_size": _at_least(0, "0: all windows at once"),
    "model.norm_target_patch_size": (lambda v: v >= 3 and v % 2 == 1, "must be odd and at least 3 (official: 47)"),
    "data.batch_size": _at_least(1, "images per device and step"),
    "data.num_workers": _at_least(0, "0 loads in the main process"),
    "data.max_bad_files": _at_least(0, "0 stops at the first unreadable image"),
    "data.shard_window": _at_least(1, "shards each rank reads at a time"),
    "data.val_fraction": _within(0, 1, "0: no held-out validation images"),
    "data.mask_ratio": (lambda v: 0 < v < 1, "must lie strictly between 0 and 1 (the paper uses 0.6)"),
    "data.label_fraction": _FRACTION,
    "data.rand_augment_ops": _at_least(0, "0: no RandAugment"),
    "data.rand_augment_magnitude": _within(0, 10, "timm's scale", open_high=False),
    "data.random_erasing": _within(0, 1, "a probability", open_high=False),
    "data.eval_resize_ratio": _at_least(1, "the shorter side is resized to ratio x img_size, then centre-cropped"),
    "optim.lr": _POSITIVE,
    "optim.warmup_lr": _at_least(0),
    "optim.min_lr": _at_least(0),
    "optim.weight_decay": _at_least(0),
    "optim.layer_decay": (lambda v: 0 < v <= 1, "must lie in (0, 1] (1: off)"),
    "optim.eps": _POSITIVE,
    "optim.momentum": _within(0, 1),
    "schedule.epochs": (lambda v: v > 0, "must be > 0 (fractions allowed)"),
    "schedule.steps": (lambda v: v is None or v >= 1, "must be >= 1, or null for a run of schedule.epochs"),
    "schedule.warmup_epochs": _at_least(0, "0: no warmup"),
    "schedule.gamma": _POSITIVE,
    "checkpoint.every_n_steps": _at_least(0, "0: no checkpoints every N steps"),
    "knn.k": _at_least(1, "neighbours"),
    "knn.temperature": _POSITIVE,
    "knn.batch_size": _at_least(1),
    "knn.every_n_epochs": _at_least(1),
    "knn.label_fraction": _FRACTION,
    "mixup.mixup_alpha": _at_least(0, "0: off"),
    "mixup.cutmix_alpha": _at_least(0, "0: off"),
    "mixup.switch_prob": _within(0, 1, "a probability", open_high=False),
    "mixup.prob": _within(0, 1, "a probability", open_high=False),
    "mixup.label_smoothing": _within(0, 1),
    "seed": _at_least(0),
    "reconstructions": _at_least(0, "0: no reconstructions.png"),
    "visualize_every_n_steps": _at_least(0, "0: no grids during training"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "schedule.name": ("cosine", "multistep", "constant"),
    "optim.name": ("adamw", "sgd"),
    "nan_policy": ("auto", "stop", "skip"),
    "memory": ("manual", "auto"),
    "mode": ("finetune", "linear_probe", "knn"),
    "data.source": ("auto", "folder", "imagefolder", "filelist", "fashion_mnist", "shards"),
}
_CHOICE_HINTS = {"memory": "manual (model.use_checkpoint, model.attn_chunk_size) or auto"}


def _value_text(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _check_rules(cfg: DictConfig) -> None:
    for key, (ok, rule) in RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__" or (value is None and key != "schedule.steps"):
            continue
        if not ok(value):
            raise RecipeError(f"{key}={_value_text(value)} {rule}")
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and value not in options:
            hint = _CHOICE_HINTS.get(key, " or ".join([", ".join(options[:-1]), options[-1]]))
            raise RecipeError(f"{key}={value!r}: use {hint}")


def _pair(cfg: DictConfig, key: str, upper: float | None) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    lo_hi = list(value)
    bound = f" <= {upper:g}" if upper is not None else ""
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] or (upper is not None and lo_hi[1] > upper):
        raise RecipeError(f"{key}={lo_hi} must be [low, high] with 0 < low <= high{bound}")


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """``{"model": name, **named config, **overrides}``: the full encoder config that ``create_model(**config)``
    rebuilds (None overrides keep the named value)."""
    from simmim.models.registry import encoder_config

    try:
        config = encoder_config(name, **overrides)
    except ValueError as e:
        raise RecipeError(f"model.name={name!r} is not a known model; {str(e).split('; ')[-1]}") from None
    config.setdefault("patch_size", 4)
    return {k: list(v) if isinstance(v, ListConfig) else v for k, v in config.items()}


def model_geometry(model: DictConfig) -> dict[str, Any]:
    """:func:`model_config` of a recipe's ``model`` section (name, img_size, window_size and the constructor keys a
    recipe may set): what builds the encoder."""
    keys = ("img_size", "window_size", *GEOMETRY_KEYS)
    return model_config(model.name, **{k: model.get(k) for k in keys})


def _check_model(cfg: DictConfig) -> dict[str, Any]:
    geo = model_geometry(cfg.model)
    depths, heads, dim = geo["depths"], geo["num_heads"], geo["embed_dim"]
    if len(depths) != len(heads):
        raise RecipeError(f"model.depths={depths} and model.num_heads={heads} must have one entry per stage each")
    for i, h in enumerate(heads):
        if (dim * 2**i) % h:
            raise RecipeError(
                f"stage {i} has {dim * 2**i} channels (model.embed_dim={dim} x 2^{i}), not divisible by its "
                f"{h} heads (model.num_heads): pick head counts that divide the channels"
            )
    windows = geo.get("pretrained_window_sizes")
    if windows is not None and len(windows) != len(depths):
        raise RecipeError(f"model.pretrained_window_sizes={windows} needs one entry per stage ({len(depths)})")
    img, patch, window = int(cfg.model.img_size), int(geo["patch_size"]), int(geo["window_size"])
    grid = img // patch
    if grid < 2 ** (len(depths) - 1):
        raise RecipeError(
            f"model.img_size={img} is too small for {len(depths)} stages with patch size {patch}: use at least "
            f"{patch * 2 ** (len(depths) - 1)} px"
        )
    if window > grid:
        raise RecipeError(
            f"model.window_size={window} is larger than the first stage's {grid}x{grid} token grid "
            f"(img_size {img} / patch {patch}): every stage would attend globally; use window_size <= {grid}"
        )
    return geo


def _check_masks(cfg: DictConfig, patch: int) -> None:
    img, mp, ratio = int(cfg.model.img_size), int(cfg.data.mask_patch_size), float(cfg.data.mask_ratio)
    if mp < 1 or img % mp:
        raise RecipeError(
            f"model.img_size={img} is not divisible by data.mask_patch_size={mp}: use an image size that is a "
            f"multiple of {mp} (e.g. {max(mp, img // max(mp, 1) * mp)}) or another mask_patch_size"
        )
    if mp % patch:
        raise RecipeError(
            f"data.mask_patch_size={mp} is not divisible by the model's patch size {patch}: use a multiple of {patch}"
        )
    cells = (img // mp) ** 2
    masked = math.ceil(cells * ratio)
    if masked >= cells:
        raise RecipeError(
            f"data.mask_ratio={ratio} with data.mask_patch_size={mp} masks all {cells} mask cells of a {img} px "
            "image: nothing is left visible to reconstruct from; lower data.mask_ratio or data.mask_patch_size"
        )


def _check_schedule(cfg: DictConfig) -> None:
    s = cfg.schedule
    if s.warmup_epochs >= s.epochs:
        raise RecipeError(
            f"schedule.warmup_epochs={s.warmup_epochs:g} is not shorter than the run (schedule.epochs={s.epochs:g}): "
            "the lr would never reach its peak; lower schedule.warmup_epochs"
        )
    milestones = list(s.milestones)
    if s.name == "multistep" and (milestones != sorted(milestones) or any(m < s.warmup_epochs for m in milestones)):
        raise RecipeError(
            f"schedule.milestones={milestones} must be increasing epochs after the warmup "
            f"(schedule.warmup_epochs={s.warmup_epochs:g})"
        )


def _check_run(cfg: DictConfig, kind: str) -> None:
    from simmim import runtime

    try:
        runtime.resolve_precision(cfg.trainer.get("precision", "auto"), "cpu")
        runtime.plan_threads(cfg.threads, workers=0)
    except ValueError as e:
        raise RecipeError(str(e).replace("precision=", "trainer.precision=", 1)) from None
    if cfg.compile_mode not in COMPILE_MODES:
        raise RecipeError(f"compile_mode={cfg.compile_mode!r} is not a torch.compile mode; use one of "
                          f"{', '.join(COMPILE_MODES)}")  # fmt: skip
    unknown = [name for name in cfg.logger if name not in LOGGERS]
    if unknown:
        raise RecipeError(
            f"logger={list(cfg.logger)}: unknown {unknown}; choose from {', '.join(LOGGERS)} ([] for none)"
        )
    if cfg.resume is not None and cfg.resume != "auto" and not str(cfg.resume).strip():
        raise RecipeError("resume= is empty: give auto, a .ckpt path, or null")


def check_recipe(cfg: DictConfig, kind: str) -> None:
    """Every range, choice and geometry check of a composed recipe (raises :class:`RecipeError`)."""
    _check_rules(cfg)
    for key in ("data.crop_scale", "data.crop_ratio"):
        _pair(cfg, key, 1.0 if key == "data.crop_scale" else None)
    geo = _check_model(cfg)
    if kind == "pretrain":
        _check_masks(cfg, int(geo["patch_size"]))
    _check_schedule(cfg)
    _check_run(cfg, kind)
    if kind == "finetune" and cfg.mode == "knn" and cfg.resume:
        raise RecipeError("mode=knn trains nothing, so there is nothing to resume: leave resume unset")
    if kind == "finetune" and cfg.mode == "finetune" and cfg.optim.name != "adamw":
        raise RecipeError(f"optim.name={cfg.optim.name!r}: fine-tuning uses adamw; sgd is for mode=linear_probe")
