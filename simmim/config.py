"""Recipes: YAML files under ``recipes/<kind>/`` picked with ``recipe=NAME`` and overridden with ``key=value``.

A recipe may start from another one with ``base: NAME`` (same folder); its keys are merged over the base's.
Every override must name a key the recipe has (``trainer.*`` takes any argument of ``lightning.Trainer``), and
a value must keep the type of the recipe's value. Errors name the key and what to do instead.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from simmim import runtime

__all__ = ["RecipeError", "recipes_dir", "available_recipes", "load_recipe", "save_recipe", "RunRuntime", "run_runtime"]


class RecipeError(ValueError):
    """A recipe or an override that cannot work; the message says what to change."""


def recipes_dir() -> Path:
    """``$SIMMIM_RECIPES`` or the ``recipes/`` folder shipped beside the package."""
    env = os.environ.get("SIMMIM_RECIPES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "recipes"


def available_recipes(kind: str) -> list[str]:
    folder = recipes_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def _read(kind: str, name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    path = Path(name) if name.endswith((".yaml", ".yml")) else recipes_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        names = available_recipes(kind)
        hint = difflib.get_close_matches(name, names, n=1)
        raise RecipeError(
            f"no {kind} recipe {name!r} (looked for {path}). Available: {', '.join(names) or 'none'}"
            + (f". Did you mean recipe={hint[0]}?" if hint else "")
        )
    if name in seen:
        raise RecipeError(f"recipe {name!r} is its own base ({' -> '.join(seen + (name,))})")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers
        raise RecipeError(f"cannot parse recipe {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values")
    cfg.pop("resolved", None)  # a saved recipe.yaml: what auto values became on the machine that wrote it
    base = cfg.pop("base", None)
    if base:
        cfg = OmegaConf.merge(_read(kind, str(base), seen + (name,)), cfg)
    return cfg


def _trainer_args() -> set[str]:
    import pytorch_lightning as pl

    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


# Keys that take fractions even where a recipe writes a whole number (e.g. ``epochs: 800``).
_FRACTIONAL = {"schedule.epochs", "schedule.warmup_epochs"}


def _check_type(key: str, old: Any, new: Any) -> None:
    if old is None or new is None:
        return
    if key in _FRACTIONAL and isinstance(old, int) and not isinstance(old, bool):
        old = float(old)
    ok = True
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
    elif isinstance(old, str):
        ok = isinstance(new, (str, int, float))  # a path or name given as a number is still text
    elif isinstance(old, (list, ListConfig)):
        ok = isinstance(new, (list, ListConfig))
    if not ok:
        raise RecipeError(f"{key}={new!r} has the wrong type: the recipe's value is {old!r}; give {_kind(old)}")


def _kind(value: Any) -> str:
    for t, words in ((bool, "true or false"), (int, "a whole number"), (float, "a number"), (str, "text")):
        if isinstance(value, t):
            return words
    return "a list, e.g. [1, 2]" if isinstance(value, (list, ListConfig)) else type(value).__name__


# Lower bounds of numeric keys (where a recipe has them), checked after the overrides: (minimum, what it means).
_MINIMA = {
    "data.batch_size": (1, "images per device and step"),
    "data.num_workers": (0, "0 loads in the main process"),
    "data.max_bad_files": (0, "0 stops at the first unreadable image"),
    "checkpoint.every_n_steps": (0, "0: no checkpoints every N steps"),
    "schedule.warmup_epochs": (0, "0: no warmup"),
    "reconstructions": (0, "0: no reconstructions.png"),
    "visualize_every_n_steps": (0, "0: no grids during training"),
}


def _check_minima(cfg: DictConfig) -> None:
    for key, (low, meaning) in _MINIMA.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise RecipeError(f"{key}={value} must be >= {low} ({meaning})")
    epochs = OmegaConf.select(cfg, "schedule.epochs")
    if isinstance(epochs, (int, float)) and epochs <= 0:
        raise RecipeError(f"schedule.epochs={epochs} must be > 0 (fractions allowed)")


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.extend(_leaf_keys(v, full + ".") if isinstance(v, DictConfig) else [full])
    return keys


def load_recipe(kind: str, args: Sequence[str], default: str = "quickstart") -> DictConfig:
    """Parse ``recipe=NAME key=value ...`` into the resolved recipe; raises :class:`RecipeError`."""
    name = default
    overrides: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise RecipeError(
                f"argument {arg!r} is not key=value. Use recipe=NAME and key=value overrides, "
                f"e.g. recipe={default} data.batch_size=32"
            )
        key, value = arg.split("=", 1)
        if key.lstrip("+") == "recipe":
            name = value
        else:
            overrides.append(arg)
    cfg = _read(kind, name)
    known = _leaf_keys(cfg)
    trainer_args = None
    for arg in overrides:
        key, value = arg.split("=", 1)
        try:
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as e:
            raise RecipeError(f"cannot parse override {arg!r}: {e}") from e
        new = OmegaConf.select(parsed, key)
        if isinstance(new, (DictConfig, ListConfig)):
            new = OmegaConf.to_container(new)
        exists = OmegaConf.select(cfg, key, default="__missing__") != "__missing__"
        if key.startswith("trainer."):
            trainer_args = trainer_args or _trainer_args()
            arg_name = key.split(".")[1]
            if arg_name not in trainer_args:
                hint = difflib.get_close_matches(arg_name, sorted(trainer_args), n=1)
                raise RecipeError(
                    f"unknown Trainer argument {key!r}" + (f"; did you mean trainer.{hint[0]}?" if hint else "")
                )
        elif not exists:
            hint = difflib.get_close_matches(key, known, n=1)
            raise RecipeError(
                f"unknown key {key!r} for recipe {name!r}"
                + (f"; did you mean {hint[0]}?" if hint else f"; known keys: {', '.join(known)}")
            )
        else:
            old = OmegaConf.select(cfg, key)
            if isinstance(old, DictConfig):
                raise RecipeError(f"{key} is a group of keys; set its members, e.g. {key}.{next(iter(old))}=...")
            if isinstance(old, ListConfig):
                old = OmegaConf.to_container(old)
            _check_type(key, old, new)
        OmegaConf.update(cfg, key, new, merge=False, force_add=True)
    _check_minima(cfg)
    cfg.recipe = name
    return cfg


def save_recipe(cfg: DictConfig, path: str | Path, resolved: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved recipe as YAML (atomically); ``resolved``: what its ``auto`` values became on this machine,
    saved under ``resolved:`` (ignored when the file is read back as a recipe, so a resume elsewhere re-resolves)."""
    from simmim.io import save_text

    out = OmegaConf.merge(cfg, {"resolved": dict(resolved)}) if resolved else cfg
    return save_text(OmegaConf.to_yaml(out, resolve=True), path)


@dataclass(frozen=True)
class RunRuntime:
    """A run's hardware decisions (simmim.runtime): its Lightning precision and torch's CPU threads."""

    precision: runtime.PrecisionChoice
    threads: runtime.ThreadPlan

    def log(self) -> None:
        """One line per decision (the CLIs call this once the run is set up, so refusals come first)."""
        log = runtime.log
        log.info("machine: %s", runtime.describe(self.threads.threads))
        log.info("precision: %s -> %s (%s)", self.precision.requested, self.precision.value, self.precision.reason)
        log.info("threads: %d (%s)", self.threads.threads, self.threads.reason)
        for key, reason in runtime.fast_paths().reasons.items():
            log.info("%s: %s", key, reason)
        if self.precision.warning:
            warnings.warn(self.precision.warning, stacklevel=2)

    def resolved(self) -> dict[str, Any]:
        """For ``recipe.yaml``: the request stays in the recipe, what it became on this machine goes beside it."""
        return runtime.summary(precision=self.precision.value, threads=self.threads.threads)


@contextlib.contextmanager
def run_runtime(cfg: DictConfig, model_config: Mapping[str, Any]) -> Iterator[RunRuntime]:
    """Resolve the recipe's ``trainer.precision`` and ``threads`` on this machine, log them once, and run the block
    with torch's CPU threads set (restored afterwards, so an in-process run leaves the caller's setting)."""
    from simmim.memory import train_gflop_per_image

    trainer = cfg.get("trainer") or {}
    try:
        precision = runtime.resolve_precision(trainer.get("precision", "auto"), trainer.get("accelerator", "auto"))
        work = train_gflop_per_image(model_config, int(cfg.model.img_size))
        threads = runtime.plan_threads(cfg.get("threads"), int(cfg.data.num_workers), work)
    except ValueError as e:
        raise RecipeError(str(e).replace("precision=", "trainer.precision=", 1)) from e
    with runtime.torch_threads(threads.threads):
        runtime.fast_paths()  # measured (or read from the cache) at these threads, and logged, before training
        yield RunRuntime(precision, threads)
