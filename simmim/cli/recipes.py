"""Recipes: ``recipes/<kind>/<name>.yaml`` composed by hydra-core over the typed schema (:mod:`simmim.cli.schema`).

``recipe=NAME key=value ...``: a recipe starts from ``_base`` through its Hydra ``defaults`` list, the overrides
follow Hydra's grammar (``data.crop_scale=[0.5,1]``, ``name=null``), every key is typed by the schema, and
``trainer.*`` takes any ``lightning.Trainer`` argument. Every refusal is one :class:`RecipeError` line naming the key
and what to do instead (did-you-mean for misspelt keys). ``recipe=PATH.yaml`` reads a saved ``recipe.yaml``.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simmim.cli.schema import SCHEMAS
from simmim.errors import RecipeError

__all__ = ["RecipeError", "recipes_dir", "available_recipes", "load_recipe", "expand_sweeps", "base_text"]


def recipes_dir() -> Path:
    """``$SIMMIM_RECIPES``, else the source tree's top-level ``recipes/`` folder beside the package, else the copy
    a wheel installs inside the package (``simmim/recipes``, see setup.cfg)."""
    env = os.environ.get("SIMMIM_RECIPES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]  # the simmim package
    source = here.parent / "recipes"  # a source checkout's top-level folder
    return source if (source / "pretrain" / "_base.yaml").is_file() else here / "recipes"  # a wheel's copy


def available_recipes(kind: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / kind).glob("*.yaml") if not p.stem.startswith("_"))


def base_text(kind: str) -> str:
    """``_base.yaml`` of ``kind``: every key with its default and a comment (``--help``)."""
    return (recipes_dir() / kind / "_base.yaml").read_text()


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for kind, schema in SCHEMAS.items():
        store.store(name=f"{kind}_schema", node=schema)


def _trainer_args() -> set[str]:
    import pytorch_lightning as pl

    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def _leaf_keys(cfg: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.extend(_leaf_keys(v, full + ".") if isinstance(v, Mapping) else [full])
    return keys


def _kind(value: Any) -> str:
    for t, words in ((bool, "true or false"), (int, "a whole number"), (float, "a number"), (str, "text")):
        if isinstance(value, t):
            return words
    return "a list, e.g. [1, 2]" if isinstance(value, (list, ListConfig)) else "a value of the recipe's type"


def _compose(kind: str, name: str, overrides: Sequence[str], base: DictConfig | None = None) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    path = Path(name) if name.endswith((".yaml", ".yml")) else recipes_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        names = available_recipes(kind)
        hint = difflib.get_close_matches(name, names, n=1)
        raise RecipeError(
            f"no {kind} recipe {name!r} (looked for {path}). Available: {', '.join(names) or 'none'}"
            + (f". Did you mean recipe={hint[0]}?" if hint else "")
        )
    _register_schemas()
    if path.parent != recipes_dir() / kind:  # a saved recipe.yaml: registered as a config node over the schema
        from hydra.core.config_store import ConfigStore

        try:
            saved = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry line numbers
            raise RecipeError(f"cannot parse recipe {path}: {e}") from e
        for key in ("resolved", "defaults", "recipe"):  # what the run wrote about itself
            saved.pop(key, None)
        try:
            node = OmegaConf.merge(OmegaConf.structured(SCHEMAS[kind]), saved)
        except OmegaConfBaseException as e:
            raise RecipeError(f"recipe {path}: {_first_line(e)}") from None
        ConfigStore.instance().store(name="_from_file", node=node)
        config_dir, config_name = recipes_dir() / kind, "_from_file"
    else:
        config_dir, config_name = path.parent, path.stem
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        raise _translate(e, base) from None
    except OmegaConfBaseException as e:  # a recipe file whose values do not fit the schema
        raise RecipeError(f"recipe {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    key = getattr(e, "full_key", None)
    return (f"{key}: " if key else "") + (text[0] if text else type(e).__name__)


def _translate(e: Exception, base: DictConfig | None) -> RecipeError:
    """Hydra's composition errors as one line naming the key."""
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if key and "could not be converted" in str(cause):
        value = str(cause).split("'")[1] if "'" in str(cause) else "?"
        old = OmegaConf.select(base, key) if base is not None else None
        if old is None:
            return RecipeError(f"{key}={value!r} has the wrong type: {str(cause).splitlines()[0]}")
        old = OmegaConf.to_container(old) if isinstance(old, ListConfig) else old
        return RecipeError(f"{key}={value!r} has the wrong type: the recipe's value is {old!r}; give {_kind(old)}")
    text = " ".join(str(e).split())
    if "Ambiguous value" in text:
        text = text.split(" 1. ")[0] + ": quote it (key='a,b') or give a list (key=[a,b]); sweeps need --multirun"
    return RecipeError(text if key is None else f"{key}: {text}")


def _is_text(cfg: DictConfig, key: str) -> bool:
    """Whether the schema types ``key`` as text (str or str | None)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
    ref = str(getattr(getattr(node, "_metadata", None), "ref_type", ""))
    return ref in ("<class 'str'>", "typing.Optional[str]", "str | None")


def _check_override(arg: str, base: DictConfig, name: str, trainer_args: set[str] | None) -> tuple[str, set[str]]:
    """The override as Hydra takes it (``++`` for a Trainer argument the recipe does not set)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "=" not in arg:
        raise RecipeError(
            f"argument {arg!r} is not key=value. Use recipe=NAME and key=value overrides, e.g. data.batch_size=32"
        )
    key, value = arg.split("=", 1)
    key = key.lstrip("+~")
    if key.startswith("trainer."):
        trainer_args = trainer_args or _trainer_args()
        arg_name = key.split(".")[1]
        if arg_name not in trainer_args:
            hint = difflib.get_close_matches(arg_name, sorted(trainer_args), n=1)
            raise RecipeError(
                f"unknown Trainer argument {key!r}" + (f"; did you mean trainer.{hint[0]}?" if hint else "")
            )
        if arg_name == "max_epochs":
            raise RecipeError(
                "set schedule.epochs (or schedule.steps) instead of trainer.max_epochs: the lr schedule follows it"
            )
        exists = OmegaConf.select(base, key, default="__missing__") != "__missing__"
        return (arg if exists else f"++{key}={value}"), trainer_args  # ++: a later value for the key wins
    if OmegaConf.select(base, key, default="__missing__") == "__missing__":
        known = _leaf_keys(OmegaConf.to_container(base))
        hint = difflib.get_close_matches(key, known, n=1)
        raise RecipeError(
            f"unknown key {key!r} for recipe {name!r}"
            + (f"; did you mean {hint[0]}?" if hint else f"; known keys: {', '.join(known)}")
        )
    old = OmegaConf.select(base, key)
    if isinstance(old, DictConfig) and key != "trainer":
        raise RecipeError(f"{key} is a group of keys; set its members, e.g. {key}.{next(iter(old))}=...")
    if _is_text(base, key) and value not in ("null", "None") and not value.startswith(("'", '"')):
        # paths and names as typed: Hydra's grammar would read '=', ',', '(', spaces... as syntax
        quote = '"' if "'" in value else "'"
        arg = f"{key}={quote}{value}{quote}"
    try:
        parsed = OverridesParser.create().parse_override(arg)
    except Exception as e:
        raise RecipeError(f"cannot parse override {arg!r}: {' '.join(str(e).split())[:200]}") from None
    new = parsed.value()
    if isinstance(old, bool) and not isinstance(new, bool) and new is not None:
        raise RecipeError(f"{key}={new!r} has the wrong type: the recipe's value is {old!r}; give {_kind(old)}")
    return arg, trainer_args or set()


def load_recipe(kind: str, args: Sequence[str], default: str = "quickstart") -> DictConfig:
    """Parse ``recipe=NAME key=value ...`` into the composed, typed and checked recipe (raises RecipeError)."""
    name, overrides = default, []
    for arg in args:
        if arg.split("=", 1)[0].lstrip("+") == "recipe":
            name = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    base = _compose(kind, name, [])
    checked, trainer_args = [], None
    for arg in overrides:
        arg, trainer_args = _check_override(arg, base, name, trainer_args)
        checked.append(arg)
    cfg = _compose(kind, name, checked, base) if checked else base
    cfg.recipe = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    from simmim.cli.checks import check_recipe

    check_recipe(cfg, kind)
    return cfg


def expand_sweeps(args: Sequence[str]) -> list[list[str]]:
    """``--multirun``: the argument lists of every combination of the sweeps in ``args`` (``key=a,b``, Hydra's
    ``range(...)`` and ``choice(...)``), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices = []
    for arg in args:
        try:
            parsed = parser.parse_override(arg) if "=" in arg else None
        except Exception as e:
            raise RecipeError(f"cannot parse override {arg!r}: {' '.join(str(e).split())[:200]}") from None
        if parsed is not None and parsed.is_sweep_override():
            key = arg.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in parsed.sweep_string_iterator()])
        else:
            choices.append([arg])
    return [list(combo) for combo in itertools.product(*choices)]
