"""AdamW parameter groups (no-weight-decay rules, layer-wise lr decay) and the per-step lr schedule.

Follows the official SimMIM / Swin code (optimizer.py, utils_simmim.py, lr_scheduler.py at SwinT f82860b):

* No weight decay for 1-D parameters, biases, names in ``no_weight_decay()`` and names containing a keyword of
  ``no_weight_decay_keywords()``.
* The official pretraining asks the SimMIM wrapper for its keywords, which it prefixes with ``encoder.``;
  matched as substrings of names like ``encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight`` they never match, so
  ``cpb_mlp`` weights and ``logit_scale`` DO get weight decay there (``mask_token`` stays exempt: it is a
  full-name match). ``official_wd_exemption_bug=True`` reproduces that; ``False`` applies every module's
  exemptions relative to that module, which is what the keywords were meant to do (and what official
  fine-tuning does).
* Layer-wise lr decay: ``lr_scale_i = layer_decay ** (L - 1 - layer_id)`` with the official layer ids
  (:func:`simmim.models.swinv2.swin_layer_id`), applied once. timm >= 0.6.5 schedulers multiply by
  ``lr_scale`` again (the scale squared); our scheduler reads the group's own peak lr and never re-applies it.
* Schedule, per optimizer step: linear warmup from ``warmup_lr`` to the group's peak lr, then cosine to
  ``min_lr`` (timm ``warmup_prefix=True``, the SwinT default) or multistep decay by ``gamma``. As in timm 0.4.12
  (used by the official code) ``warmup_lr`` and ``min_lr`` are not multiplied by the layer scale.
* lr, warmup lr and min lr are given per 512 images and scaled by ``total_batch / 512``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from simmim.errors import RecipeError

__all__ = [
    "param_groups",
    "build_optimizer",
    "scale_lr",
    "LRSchedule",
    "build_scheduler",
    "check_max_steps",
    "run_length",
]


def _exemptions(model: nn.Module, official_wd_exemption_bug: bool) -> tuple[set[str], list[tuple[str, str]]]:
    """(full names exempt from decay, (prefix, keyword) pairs: exempt names start with prefix, contain keyword)."""
    if official_wd_exemption_bug:
        names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        kws = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
        return names, [("", k) for k in kws]
    names: set[str] = set()
    keywords: list[tuple[str, str]] = []
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if hasattr(module, "no_weight_decay"):
            names |= {p + n for n in module.no_weight_decay()}
        if hasattr(module, "no_weight_decay_keywords"):
            keywords += [(p, k) for k in module.no_weight_decay_keywords()]
    return names, keywords


def _find_layer_rule(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """The (layer_id(full name), number of layer ids) of the first submodule offering ``layer_id``."""
    for prefix, module in model.named_modules():
        if hasattr(module, "layer_id") and hasattr(module, "num_lr_layers"):
            p = f"{prefix}." if prefix else ""

            def layer_id(name: str, p: str = p, m: nn.Module = module) -> int:
                return m.layer_id(name.removeprefix(p))

            return layer_id, module.num_lr_layers
    raise ValueError(
        f"layer_decay needs a model with layer_id()/num_lr_layers (a SwinV2); {type(model).__name__} has none"
    )


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    official_wd_exemption_bug: bool = False,
    ndims: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for AdamW: one per (decay / no decay, layer id), each with ``weight_decay``,
    ``lr_scale`` (layer-wise decay, 1.0 when ``layer_decay == 1``) and ``param_names``.

    ``ndims``: each parameter's number of dimensions before a strategy sharded it (FSDP turns parameters into
    1-D shards, which would all look like biases); default: the parameters' own."""
    skip, keywords = _exemptions(model, official_wd_exemption_bug)
    layer_id, num_layers = _find_layer_rule(model) if layer_decay != 1.0 else (lambda n: 0, 1)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            (ndims[name] if ndims else param.ndim) <= 1
            or name.endswith(".bias")
            or name in skip
            or any(name.startswith(p) and k in name[len(p) :] for p, k in keywords)
        )
        lid = layer_id(name)
        key = (no_decay, lid)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - 1 - lid),
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    official_wd_exemption_bug: bool = False,
    ndims: Mapping[str, int] | None = None,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; each group's lr is ``lr * lr_scale`` (its peak for the schedule).
    ``fused``: one kernel over all parameters (see :func:`fused_adamw_ok`)."""
    groups = param_groups(model, weight_decay, layer_decay, official_wd_exemption_bug, ndims)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def fused_adamw_ok(trainer: pl.Trainer) -> bool:
    """Whether a run can use fused AdamW (SwinV2-T: 20 ms a step instead of 97 ms for foreach, 1 CPU thread): the
    parameters are plain tensors on CPU or CUDA (single device or DDP, not FSDP/DeepSpeed, which own the
    optimizer step) and no fp16 GradScaler unscales inside the fused step (the gradients could not be clipped).
    Clipping then goes through :func:`clip_gradients`."""
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    return (
        type(strategy) in (SingleDeviceStrategy, DDPStrategy)
        and getattr(strategy.precision_plugin, "scaler", None) is None
        and strategy.root_device.type in ("cpu", "cuda")
    )


def clip_gradients(
    module: pl.LightningModule, optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm: str | None
) -> None:
    """``configure_gradient_clipping`` for our modules, clipping by norm where Lightning's own hook refuses to:
    for fused optimizers under a mixed-precision plugin (Lightning fears fp16 loss scaling; with no GradScaler, as
    :func:`fused_adamw_ok` ensures, the gradients are true gradients) and under FSDP (the norm of sharded gradients
    needs the root module's ``clip_grad_norm_``, which reduces it over the processes)."""
    from pytorch_lightning.strategies import FSDPStrategy

    if not clip_val or (algorithm or "norm") != "norm":
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
    elif isinstance(module.trainer.strategy, FSDPStrategy):
        module.trainer.strategy.model.clip_grad_norm_(clip_val)
    elif any(g.get("fused") for g in optimizer.param_groups) and fused_adamw_ok(module.trainer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)


def scale_lr(lr_per_512: float, total_batch: int) -> float:
    """Linear scaling rule of the official code: ``lr * total_batch / 512``, where total_batch =
    batch per device * devices * nodes * gradient accumulation steps."""
    return lr_per_512 * total_batch / 512.0


def run_length(epochs: float, steps: int | None, max_steps: int | None) -> tuple[int, int]:
    """Lightning's ``(max_epochs, max_steps)`` for a run of ``schedule.steps`` optimizer steps when given (epochs then
    unlimited), else of ``schedule.epochs`` (rounded up); ``trainer.max_steps`` > 0 only stops it earlier."""
    max_steps = max_steps if max_steps is not None and max_steps > 0 else -1
    if steps:
        return -1, max_steps if max_steps > 0 else int(steps)
    return int(math.ceil(epochs)), max_steps


def check_max_steps(max_steps: int, total: int, epochs: float, steps: int | None) -> None:
    """``trainer.max_steps`` stops a run early; past the schedule's end it would be cut off there: refuse it."""
    if max_steps > total:
        length = f"schedule.steps={steps}" if steps else f"schedule.epochs={epochs}"
        raise RecipeError(
            f"trainer.max_steps={max_steps} is more than the {total} optimizer steps of the lr schedule ({length}): "
            f"trainer.max_steps only stops a run early; set schedule.steps={max_steps} for a run (and schedule) of "
            f"{max_steps} steps"
        )


@dataclass(frozen=True)
class LRSchedule:
    """lr as a function of the optimizer step for a group peaking at ``peak``: linear warmup from
    ``warmup_lr`` over ``warmup_steps``, then ``cosine`` to ``min_lr`` at ``total_steps`` or ``multistep``
    (times ``gamma`` at each of ``milestones`` steps) or ``constant``."""

    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    name: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in ("cosine", "multistep", "constant"):
            raise ValueError(f"unknown lr schedule {self.name!r}: use cosine, multistep or constant")
        if self.name == "multistep" and self.milestones and self.warmup_steps > min(self.milestones):
            raise ValueError(f"warmup ({self.warmup_steps} steps) ends after the first milestone {self.milestones}")

    def __call__(self, step: int, peak: float) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (peak - self.warmup_lr) * step / self.warmup_steps
        if self.name == "multistep":
            return peak * self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.name == "constant":
            return peak
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(step - self.warmup_steps, span)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * t / span))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; every group follows ``schedule`` up to its own peak lr
    (its lr at construction, ``lr * lr_scale``)."""

    def multiplier(peak: float) -> Callable[[int], float]:
        # a plain function, so LambdaLR keeps it out of state_dict (checkpoints stay weights-only loadable)
        return lambda step: schedule(step, peak) / peak if peak else 0.0

    peaks: Iterable[float] = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return LambdaLR(optimizer, [multiplier(p) for p in peaks])
