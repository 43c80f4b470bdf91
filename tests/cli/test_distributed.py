"""Multi-process pretraining on CPU (gloo): 2 processes match 1 with the same global batch, ZeRO stage 1 matches
plain AdamW, and checkpoints move between process counts and gradient accumulation settings.

Multi-process runs go through the real CLI in a subprocess: Lightning's launcher re-executes the command."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import pretrain_args, write_images

from simmim.cli.pretrain import run
from simmim.cli.recipes import load_recipe
from simmim.errors import RecipeError
from simmim.training.strategy import build_strategy, rescale_position, seed_rank


def _metrics(run_dir, key):
    """{global step: value} of ``key`` from the run's last CSV log."""
    logs = sorted((Path(run_dir) / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(logs[-1] / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _ckpt(run_dir, step):
    return torch.load(Path(run_dir) / "checkpoints" / f"step={step:06d}.ckpt", weights_only=True)


def _assert_close(got, ref, steps, tol):
    assert sorted(got) == steps, got
    for step in steps:
        assert got[step] == pytest.approx(ref[step], abs=tol), (step, got[step], ref[step])


@pytest.mark.slow
def test_two_processes_zero_and_resume_across_process_counts(tmp_path):
    """40 images, global batch 8 (5 steps an epoch):
    A  1 process x batch 8, plain AdamW, steps 0-5 (the reference);
    B  2 processes x batch 4, DDP, steps 0-1;
    C  2 processes x batch 4, ZeRO stage 1, resumed from B's step-2 checkpoint (full state -> shards), steps 2-3;
    D  1 process x batch 4 x accumulation 2, plain AdamW, resumed from C's consolidated step-4 checkpoint (mid-epoch:
       the data position is rescaled to the smaller loader batch), steps 4-5.
    quickstart's visualisation callback reads training images before the trainer exists: the processes must still
    get their own shards."""
    images = write_images(tmp_path / "images", 40)
    a, b, c, d = (tmp_path / x for x in "abcd")
    run(load_recipe("pretrain", pretrain_args(images, a, "data.batch_size=8", "trainer.max_steps=6")))
    ddp = ("data.batch_size=4", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")
    res = _cli(*pretrain_args(images, b, *ddp, "trainer.max_steps=2", "memory=auto"))
    assert (res.stdout + res.stderr).count("memory=auto: est.") == 1  # planned on rank 0, logged once
    resume_b = f"resume={b}/checkpoints/step=000002.ckpt"
    _cli(*pretrain_args(images, c, *ddp, "optim.zero=true", "trainer.max_steps=4", resume_b))
    accumulate = ("data.batch_size=4", "trainer.accumulate_grad_batches=2", "trainer.max_steps=6")
    run(load_recipe("pretrain", pretrain_args(images, d, *accumulate, f"resume={c}/checkpoints/step=000004.ckpt")))

    # Losses are means over both processes (every image has the same number of masked pixels), gradients are
    # DDP averages: float32 summation order is the only difference.
    loss_a, norm_a = _metrics(a, "train/loss"), _metrics(a, "train/grad_norm")
    _assert_close(_metrics(b, "train/loss"), loss_a, [0, 1], 1e-5)
    _assert_close(_metrics(b, "train/grad_norm"), norm_a, [0, 1], 1e-5)
    _assert_close(_metrics(c, "train/loss"), loss_a, [2, 3], 1e-5)
    _assert_close(_metrics(c, "train/grad_norm"), norm_a, [2, 3], 1e-5)
    _assert_close(_metrics(d, "train/grad_norm"), norm_a, [4, 5], 1e-5)  # per micro-batch losses differ

    # The sharded run's checkpoint holds the full AdamW state, in the plain optimizer's format and order.
    ref, zero = _ckpt(a, 4), _ckpt(c, 4)
    (opt_ref,), (opt_zero,) = ref["optimizer_states"], zero["optimizer_states"]
    assert len(opt_zero["state"]) == len(opt_ref["state"]) > 0
    for i, state in opt_ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_zero["state"][i][key], state[key], atol=1e-6, rtol=1e-4)
        assert float(opt_zero["state"][i]["step"]) == float(state["step"]) == 4
    for g_ref, g_zero in zip(opt_ref["param_groups"], opt_zero["param_groups"], strict=True):
        for key in ("params", "param_names", "lr", "initial_lr", "weight_decay"):
            assert g_zero[key] == pytest.approx(g_ref[key]) if key.endswith("lr") else g_zero[key] == g_ref[key]
    assert {g["weight_decay"] for g in opt_zero["param_groups"]} == {0.0, 0.05}
    rng = zero["simmim"]["torch_rng"]  # one generator state per rank, each rank its own stream
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(zero["state_dict"][key], value, atol=1e-5, rtol=1e-4)

    # The 2-process run's exported encoder holds its final weights (written once, from rank 0).
    from safetensors.torch import load_file

    final_b = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = load_file(b / "encoder.safetensors")
    assert exported and "mask_token" not in exported
    for key, value in exported.items():
        assert torch.equal(value, final_b[f"model.encoder.{key}"]), key

    final_a = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    final_d = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_d["global_step"] == final_a["global_step"] == 6
    for key, value in final_a["state_dict"].items():
        torch.testing.assert_close(final_d["state_dict"][key], value, atol=1e-5, rtol=1e-4)


def test_accumulation_drops_partial_step_and_scales_lr(tmp_path):
    """7 batches of 4 with accumulation 3: two full optimizer steps an epoch, the 7th batch is dropped, and the lr
    is scaled by 4 x 3 = 12 images."""
    images = write_images(tmp_path / "images", 28)
    seen = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, batch_idx))

    args = pretrain_args(images, tmp_path / "run", "data.batch_size=4", "trainer.accumulate_grad_batches=3")
    args += ["schedule.name=constant", "schedule.warmup_epochs=0", "checkpoint.every_n_steps=0"]
    out = run(load_recipe("pretrain", args), callbacks=[Count()])
    assert out["steps"] == 4  # 2 epochs x 2 steps
    assert seen == [(e, i) for e in (0, 1) for i in range(6)]
    ck = torch.load(out["checkpoint"], weights_only=True)
    assert ck["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.2 * 12 / 512)


def test_rescale_position_counts_images():
    assert rescale_position(3, 8, 8) == 3
    assert rescale_position(3, None, 4) == 3  # checkpoints from before the position was recorded
    assert rescale_position(3, 8, 4) == 6
    with pytest.warns(UserWarning, match="4 of them are seen again"):
        assert rescale_position(3, 4, 8) == 1


def test_seed_rank_gives_each_rank_its_own_stream():
    def draw(rank, world, saved=None):
        torch.manual_seed(7)
        seed_rank(SimpleNamespace(global_rank=rank, world_size=world), saved)
        return torch.rand(3)

    single = draw(0, 1)
    assert torch.equal(draw(0, 2), single)  # rank 0 keeps the one-process stream
    assert not torch.equal(draw(1, 2), single)
    torch.manual_seed(3)
    saved = torch.stack([torch.get_rng_state(), torch.manual_seed(4).get_state()])
    expected = torch.rand(3)  # continues the stream of the generator seeded with 4, i.e. row 1
    assert torch.equal(draw(1, 2, saved), expected)
    assert torch.equal(draw(1, 3, saved[:1]), draw(1, 3))  # a rank the checkpoint did not have: seed + rank


def test_fsdp_recipe_shards_per_block_and_cpu_gets_a_clear_error(tmp_path):
    from pytorch_lightning.strategies import FSDPStrategy

    from simmim.models.layers import PatchMerging
    from simmim.models.swinv2 import SwinTransformerBlock

    strategy = build_strategy("fsdp")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {SwinTransformerBlock, PatchMerging}
    assert build_strategy("ddp") == "ddp"
    images = write_images(tmp_path / "images", 8)
    fsdp = ("data.batch_size=4", "trainer.strategy=fsdp", "trainer.accelerator=cpu")
    args = pretrain_args(images, tmp_path / "run", *fsdp)
    with pytest.raises(RecipeError, match="trainer: The strategy `fsdp` requires a GPU"):
        run(load_recipe("pretrain", args))


def test_trained_model_rebuilds_the_whole_model_from_gathered_weights(monkeypatch):
    """Under a sharded strategy the final encoder and reconstructions come from a plain copy built from the gathered
    state dict (FSDP itself needs a GPU; its gather is replaced by the module's own full state dict here)."""
    from conftest import pretrain_module
    from pytorch_lightning.strategies import FSDPStrategy

    from simmim.cli.pretrain import trained_model

    module = pretrain_module(["model.norm_target=true", "model.norm_target_patch_size=7"])
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    strategy = FSDPStrategy()
    monkeypatch.setattr(strategy, "lightning_module_state_dict", module.state_dict)
    trainer = SimpleNamespace(strategy=strategy, is_global_zero=True)
    copy = trained_model(trainer, module)
    assert copy is not module.model and copy.norm_target == module.model.norm_target
    x, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 8, 8) > 0.4).long()
    module.model.eval(), copy.eval()
    torch.testing.assert_close(copy(x, mask), module.model(x, mask), rtol=0, atol=0)
    assert trained_model(SimpleNamespace(strategy=strategy, is_global_zero=False), module) is None
