import pytest
from omegaconf import OmegaConf

from simmim.config import RecipeError, available_recipes, load_recipe, save_recipe
from simmim.pretrain import check_geometry

OFFICIAL = ["swinv2_tiny", "swinv2_small", "swinv2_base", "swinv2_large", "swinv2_huge", "swinv2_giant"]


def _error(*args) -> str:
    with pytest.raises(RecipeError) as e:
        check_geometry(load_recipe("pretrain", list(args)))
    return str(e.value)


def test_every_pretrain_recipe_loads_and_is_consistent():
    names = available_recipes("pretrain")
    assert {"quickstart", "imagenette_cpu"} <= set(names)
    for model in OFFICIAL:
        assert f"{model}_192_w12_800ep" in names
    for name in names:
        cfg = load_recipe("pretrain", [f"recipe={name}"])
        check_geometry(cfg)
        assert cfg.recipe == name


def test_official_base_recipe_values():
    cfg = load_recipe("pretrain", ["recipe=swinv2_base_192_w12_800ep"])
    assert (cfg.model.name, cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path_rate) == (
        "swinv2_base",
        192,
        12,
        0.1,
    )
    assert (cfg.data.mask_patch_size, cfg.data.mask_ratio) == (32, 0.6)
    assert (cfg.model.norm_target, cfg.model.norm_target_patch_size) == (True, 47)
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.weight_decay) == (1e-4, 5e-7, 0.05)
    assert (cfg.schedule.name, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == ("multistep", 800, 10)
    assert list(cfg.schedule.milestones) == [700] and cfg.schedule.gamma == 0.1
    assert cfg.trainer.gradient_clip_val == 5.0
    total = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches
    assert total == 2048
    assert cfg.optim.official_wd_exemption_bug is True


def test_default_recipe_is_quickstart():
    assert load_recipe("pretrain", []).recipe == "quickstart"


def test_unknown_key_suggests():
    with pytest.raises(RecipeError, match=r"unknown key 'optim.weight_decy' .*did you mean optim.weight_decay\?"):
        load_recipe("pretrain", ["optim.weight_decy=0.1"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(RecipeError, match=r"data.batch_size='big' has the wrong type.*give a whole number"):
        load_recipe("pretrain", ["data.batch_size=big"])
    with pytest.raises(RecipeError, match=r"model.norm_target=3 has the wrong type.*give true or false"):
        load_recipe("pretrain", ["model.norm_target=3"])
    assert load_recipe("pretrain", ["schedule.epochs=1.5"]).schedule.epochs == 1.5  # fractions where documented


@pytest.mark.parametrize(
    "kind, arg, match",
    [
        ("pretrain", "data.batch_size=0", r"data.batch_size=0 must be >= 1"),
        ("finetune", "data.batch_size=-4", r"data.batch_size=-4 must be >= 1"),
        ("finetune", "checkpoint.every_n_steps=-1", r"checkpoint.every_n_steps=-1 must be >= 0 \(0: no"),
        ("pretrain", "data.num_workers=-1", r"data.num_workers=-1 must be >= 0"),
        ("finetune", "schedule.epochs=0", r"schedule.epochs=0 must be > 0"),
    ],
)
def test_out_of_range_values_are_refused(kind, arg, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(kind, [arg])
    load_recipe(kind, [arg.split("=")[0] + "=2"])  # an in-range value of the same key passes


def test_missing_recipe_lists_available():
    with pytest.raises(RecipeError) as e:
        load_recipe("pretrain", ["recipe=nope"])
    assert "no pretrain recipe 'nope'" in str(e.value)
    assert "quickstart" in str(e.value) and "swinv2_base_192_w12_800ep" in str(e.value)


def test_unknown_trainer_argument():
    with pytest.raises(RecipeError, match=r"unknown Trainer argument 'trainer.max_step'.*trainer.max_steps"):
        load_recipe("pretrain", ["trainer.max_step=3"])


@pytest.mark.parametrize(
    "args, text",
    [
        (["data.mask_patch_size=12"], "model.img_size=32 is not divisible by data.mask_patch_size=12"),
        (["model.img_size=48", "data.mask_patch_size=6"], "data.mask_patch_size=6 is not divisible by the model's"),
        (["data.mask_ratio=1.0"], "data.mask_ratio=1.0 must lie strictly between 0 and 1"),
        (["data.mask_ratio=0"], "data.mask_ratio=0.0 must lie strictly between 0 and 1"),
        (["model.window_size=12"], "model.window_size=12 is larger than the first stage's 8x8 token grid"),
        (["model.name=swinv3"], "model.name='swinv3' is not a known model"),
        (["model.norm_target=true", "model.norm_target_patch_size=8"], "must be odd"),
        (["model.norm_target=true", "model.norm_target_patch_size=1"], "at least 3"),
        (["nan_policy=ignore"], "nan_policy='ignore': use auto, stop or skip"),
    ],
)
def test_impossible_geometry_is_caught_before_any_work(args, text):
    assert text in _error(*args)


def test_save_recipe_roundtrip(tmp_path):
    cfg = load_recipe("pretrain", ["data.batch_size=7"])
    path = save_recipe(cfg, tmp_path / "recipe.yaml")
    assert OmegaConf.load(path).data.batch_size == 7


def test_threads_default_to_auto():
    for kind, recipe in (("pretrain", "quickstart"), ("pretrain", "imagenette_cpu"), ("finetune", "knn")):
        assert load_recipe(kind, [f"recipe={recipe}"]).threads == "auto"
    assert load_recipe("pretrain", ["threads=2"]).threads == 2
