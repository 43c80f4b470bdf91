import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit_tiny_pretraining, kill_once_written, pretrain_args

from simmim.cli.pretrain import run
from simmim.cli.recipes import load_recipe
from simmim.errors import RecipeError
from simmim.io import load_encoder
from simmim.models import create_model
from simmim.training.callbacks import NonFiniteError
from simmim.training.trainer import AtomicCheckpointIO

STEPS = 14  # 24 images, batch 4: 6 steps per epoch, so runs cross two epoch boundaries


def _args(folder, run_dir, *extra):
    steps = (f"trainer.max_steps={STEPS}", "schedule.epochs=3", "checkpoint.every_n_steps=3")
    # drop path exercises the global RNG across resumes
    small = ("data.batch_size=4", "model.drop_path_rate=0.1", "visualize_every_n_steps=0")
    return pretrain_args(folder, run_dir, *small, *steps, *extra)


def _losses(run_dir, version=None):
    """{global step: loss} from the run's CSV metrics (last launch unless ``version``)."""
    logs = sorted((Path(run_dir) / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    path = (logs[-1] if version is None else Path(run_dir) / "logs" / f"version_{version}") / "csv" / "metrics.csv"
    with open(path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    """An uninterrupted run of STEPS steps with checkpoints every 3 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = run(load_recipe("pretrain", _args(image_folder, run_dir)))
    return run_dir, out


def test_lightning_module_fit_lowers_loss(image_folder, tmp_path):
    schedule = {"name": "cosine", "epochs": 10, "warmup_epochs": 1}
    module, seen = fit_tiny_pretraining(
        image_folder, schedule, max_epochs=10, precision="bf16-mixed", gradient_clip_val=5.0
    )
    assert len(seen) == 30
    assert sum(seen[-5:]) / 5 < 0.8 * sum(seen[:5]) / 5, seen
    # lr scaled by total batch / 512 and warmed up from 0 over one epoch (3 steps)
    assert module.optimizers().param_groups[0]["initial_lr"] == pytest.approx(0.5 * 8 / 512)


def test_reference_run_outputs(reference):
    run_dir, out = reference
    assert out["steps"] == STEPS
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step=000003.ckpt", "step=000006.ckpt", "step=000009.ckpt", "step=000012.ckpt"]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled objects inside
    assert ck["global_step"] == STEPS
    assert "model.encoder.patch_embed.proj.weight" in ck["state_dict"]
    assert ck["hyper_parameters"]["model_config"]["model"] == "swinv2_nano"


def test_resume_from_mid_epoch_checkpoint_matches(reference, image_folder, tmp_path):
    ref_dir, _ = reference
    ckpt = ref_dir / "checkpoints" / "step=000009.ckpt"  # epoch 1, batch 3 of 6
    run(load_recipe("pretrain", _args(image_folder, tmp_path, f"resume={ckpt}")))
    ref, resumed = _losses(ref_dir), _losses(tmp_path)
    assert sorted(resumed) == list(range(9, STEPS))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), step


def test_resuming_a_finished_run_does_nothing(reference, image_folder, tmp_path):
    run_dir = Path(shutil.copytree(reference[0], tmp_path / "done"))
    outputs = ["encoder.safetensors", "checkpoints/last.ckpt"]
    before = {name: (run_dir / name).stat().st_mtime_ns for name in outputs}
    out = run(load_recipe("pretrain", _args(image_folder, run_dir, "resume=auto")))
    assert out["steps"] == STEPS and out["already_complete"] and "encoder" not in out
    assert {name: (run_dir / name).stat().st_mtime_ns for name in outputs} == before  # nothing rewritten


def test_resuming_with_another_schedule_warns(reference, image_folder, tmp_path):
    ckpt = reference[0] / "checkpoints" / "step=000009.ckpt"
    with pytest.warns(UserWarning, match=r"another lr schedule than the checkpoint's: schedule.epochs=4 \(was 3\)$"):
        run(load_recipe("pretrain", _args(image_folder, tmp_path, f"resume={ckpt}", "schedule.epochs=4")))


def test_atomic_checkpoint_survives_crash_during_write(reference, tmp_path):
    good = tmp_path / "last.ckpt"
    good.write_bytes((reference[0] / "checkpoints" / "step=000003.ckpt").read_bytes())
    before = good.read_bytes()

    class Crash:
        def __reduce__(self):
            raise OSError("disk pulled mid-write")

    big = {"state_dict": {"w": torch.zeros(1 << 20)}, "boom": Crash()}  # tensor data is written before the crash
    with pytest.raises(OSError, match="mid-write"):
        AtomicCheckpointIO().save_checkpoint(big, good)
    assert good.read_bytes() == before
    assert torch.load(good, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_schedule_steps_sets_the_run_length_and_the_schedule_follows(image_folder, tmp_path):
    """schedule.steps past schedule.epochs (one epoch = 6 steps here) runs that many steps, the cosine schedule laid
    over them: warmup over warmup_epochs / epochs of them, min_lr at the end."""
    extra = ("schedule.steps=12", "schedule.epochs=1", "schedule.warmup_epochs=0.25", "schedule.name=cosine")
    out = run(load_recipe("pretrain", _args(image_folder, tmp_path, *extra, "trainer.max_steps=-1", "optim.min_lr=0")))
    assert out["steps"] == 12
    with open(next((tmp_path / "logs").glob("version_*/csv/metrics.csv"))) as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")}
    peak = 0.2 * 4 / 512
    assert sorted(lr) == list(range(12))
    assert lr[3] == pytest.approx(peak)  # warmup: 0.25 of 12 steps
    assert lr[0] < lr[1] < lr[2] < lr[3] > lr[6] > lr[11] > 0
    assert lr[11] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * 8 / 9)))  # 8 of 9 decay steps done


def test_a_run_stopped_by_max_steps_mid_epoch_resumes_exactly(image_folder, tmp_path):
    """trainer.max_steps=5 stops inside the first epoch (6 steps); resume=auto continues with batch 6 of it."""
    steps = ("schedule.steps=9", "schedule.epochs=1.5", "checkpoint.every_n_steps=0")
    whole = run(load_recipe("pretrain", _args(image_folder, tmp_path / "whole", *steps, "trainer.max_steps=-1")))
    pieces = _args(image_folder, tmp_path / "pieces", *steps)
    run(load_recipe("pretrain", [*pieces, "trainer.max_steps=5"]))
    out = run(load_recipe("pretrain", [*pieces, "trainer.max_steps=-1", "resume=auto"]))
    assert whole["steps"] == out["steps"] == 9
    ref, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "pieces")
    assert sorted(resumed) == list(range(5, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], abs=1e-6), step


def test_max_steps_past_the_schedule_is_refused(image_folder, tmp_path):
    with pytest.raises(RecipeError, match=r"max_steps=14 is more than the 6 optimizer steps.*schedule.steps=14"):
        run(load_recipe("pretrain", _args(image_folder, tmp_path, "schedule.epochs=1")))
    with pytest.raises(RecipeError, match=r"max_steps=14 is more than the 8 optimizer steps .*\(schedule.steps=8\)"):
        run(load_recipe("pretrain", _args(image_folder, tmp_path / "b", "schedule.steps=8")))


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_checkpoints(reference, image_folder):
    run_dir = reference[0]
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(RecipeError, match=r"already holds checkpoints of an earlier run .*last.ckpt.*resume=auto"):
        run(load_recipe("pretrain", _args(image_folder, run_dir)))
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before


class PoisonBatch(pl.Callback):
    """Fills the images of the batch at optimizer step ``step`` with NaN (a corrupt sample / overflow)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"].fill_(float("nan"))


def test_nan_stops_with_message_and_keeps_good_checkpoint(image_folder, tmp_path):
    cfg = load_recipe("pretrain", _args(image_folder, tmp_path, "checkpoint.every_n_steps=2", "nan_policy=auto"))
    with pytest.raises(NonFiniteError) as e:
        run(cfg, callbacks=[PoisonBatch(5)])
    msg = str(e.value)
    assert "optimizer step 5" in msg and "loss is nan" in msg
    assert "model.encoder.patch_embed.proj.weight" in msg and "nan_policy=skip" in msg
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in msg
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    for path in ckpts:
        ck = torch.load(path, weights_only=True)
        assert ck["global_step"] == (4 if path.name == "last.ckpt" else int(path.stem[5:]))
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_nan_skip_policy_drops_the_update(image_folder, tmp_path):
    cfg = load_recipe("pretrain", _args(image_folder, tmp_path, "trainer.max_steps=6", "nan_policy=skip"))
    out = run(cfg, callbacks=[PoisonBatch(3)])
    assert out["steps"] == 6
    losses = _losses(tmp_path)
    assert losses[3] != losses[3]  # the poisoned step's loss is NaN ...
    assert all(v == v for s, v in losses.items() if s != 3)  # ... and training went on with finite losses
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert ck["callbacks"]["NonFiniteGuard"]["skipped"] == 1


@pytest.mark.slow
def test_cli_outputs(image_folder, tmp_path):
    res = _cli(*_args(image_folder, tmp_path, "trainer.max_steps=4", "reconstructions=4", "visualize_every_n_steps=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"encoder         {tmp_path / 'encoder.safetensors'}" in res.stdout
    for name in ("recipe.yaml", "checkpoints/last.ckpt", "encoder.safetensors", "reconstructions.png"):
        assert (tmp_path / name).is_file(), name
    assert "batch_size: 4" in (tmp_path / "recipe.yaml").read_text()
    grids = sorted(p.name for p in (tmp_path / "reconstructions").glob("*.png"))
    assert grids == ["step_000000.png", "step_000002.png", "step_000004.png"]
    sd, config = load_encoder(tmp_path / "encoder.safetensors")
    assert "mask_token" not in sd and not any(k.startswith("encoder.") for k in sd)
    encoder = create_model(config.pop("model"), num_classes=0, **config)
    encoder.load_state_dict(sd)  # strict: the export rebuilds exactly
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(
        ck["state_dict"]["model.encoder.layers.0.blocks.0.attn.qkv.weight"], sd["layers.0.blocks.0.attn.qkv.weight"]
    )
    from PIL import Image

    assert Image.open(tmp_path / "reconstructions.png").size[0] > 4 * 32


@pytest.mark.parametrize(
    "args, text",
    [
        (["data.batchsize=3"], "unknown key 'data.batchsize'"),
        (["data.mask_patch_size=12"], "model.img_size=32 is not divisible by data.mask_patch_size=12"),
        (["compile=true", "compile_mode=fast"], "compile_mode='fast' is not a torch.compile mode"),
        (["model.init_from=nope.ckpt"], "model.init_from=nope.ckpt: checkpoint nope.ckpt does not exist"),
    ],
)
def test_cli_errors_are_one_line(args, text):
    res = _cli(*args, timeout=120)
    assert res.returncode == 2
    assert text in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_cli_unreadable_images_in_a_loader_worker_end_in_one_error_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(6):
        (bad / f"{i}.png").write_bytes(b"not an image")
    res = _cli(*_args(bad, tmp_path / "run", "data.num_workers=1", "trainer.max_steps=2"))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    expected = "error: all 6 training image files were tried and every one is unreadable"
    assert last.startswith(expected), res.stderr[-3000:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_cli_skipped_images_are_one_warning_line_each(image_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in image_folder.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"not an image")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *_args(data, tmp_path / "run", "data.num_workers=1")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    hits = [i for i, line in enumerate(lines) if "skipping unreadable image" in line]
    assert hits and all(lines[i].startswith("warning: skipping unreadable image") for i in hits), res.stderr[-3000:]
    assert all("self.dataset[idx]" not in lines[i + 1] for i in hits if i + 1 < len(lines))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto(reference, image_folder, tmp_path):
    ref_losses = _losses(reference[0])
    args = _args(image_folder, tmp_path, "checkpoint.keep_all=false")
    pid = kill_once_written("simmim.pretrain", args, tmp_path / "checkpoints" / "step=000003.ckpt")
    stale = tmp_path / "checkpoints" / f".step=000006.ckpt.tmp{pid}"  # as a kill during a save leaves it
    stale.write_bytes(b"half a checkpoint")
    res = _cli(*args, "resume=auto")
    assert not stale.exists()
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _losses(tmp_path)
    start = min(resumed)
    assert 3 <= start < STEPS and max(resumed) == STEPS - 1
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref_losses[step], abs=1e-6), step


@pytest.mark.slow
def test_compiled_run_matches_eager(image_folder, tmp_path):
    """compile=true (inductor, ~1 min to compile here) trains like the eager model: same losses, same
    checkpoint keys (nn.Module.compile adds no prefix), and the encoder exports."""
    steps = ("trainer.max_steps=4", "model.drop_path_rate=0.0")
    eager = run(load_recipe("pretrain", _args(image_folder, tmp_path / "eager", *steps)))
    compiled = run(load_recipe("pretrain", _args(image_folder, tmp_path / "compiled", *steps, "compile=true")))
    ref, got = _losses(eager["run_dir"]), _losses(compiled["run_dir"])
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3]
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step
    keys = lambda out: set(torch.load(out["checkpoint"], weights_only=True)["state_dict"])  # noqa: E731
    assert keys(compiled) == keys(eager)
    assert compiled["encoder"].is_file()
