import contextlib
import logging

import pytest
import torch
from conftest import fit_tiny_pretraining

from simmim.cli.checks import model_config
from simmim.cli.recipes import load_recipe
from simmim.errors import RecipeError
from simmim.models.swinv2 import SwinTransformerBlock
from simmim.training.memory import MemoryPlanner, available_memory, block_geometry, plan_memory

BASE = model_config("swinv2_base", img_size=192, window_size=12)
BASE_PARAMS = 87_000_000


def _saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves for the backward pass of ``fn(*args)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_block_geometry_follows_stages_and_global_windows():
    blocks = block_geometry(BASE, 192, 2)
    assert len(blocks) == 24
    first, last = blocks[0], blocks[-1]
    assert (first.tokens, first.channels, first.heads) == (2 * 48 * 48, 128, 4)
    assert (first.window_tokens, first.windows) == (144, 16)
    # the 6x6 last stage is smaller than the 12-token window: one global 6x6 window
    assert (last.tokens, last.channels, last.heads, last.window_tokens, last.windows) == (2 * 36, 1024, 32, 36, 1)
    padded = block_geometry(model_config("swinv2_tiny", img_size=224, window_size=12), 224, 1)[0]
    assert padded.tokens == 60 * 60 and padded.windows == 25  # 56x56 padded to whole 12-token windows


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("dim, heads, res, window, batch", [(64, 2, 16, 8, 2), (32, 4, 32, 16, 1), (96, 3, 28, 7, 2)])
def test_block_estimate_matches_saved_tensors(precision, dim, heads, res, window, batch):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim, (res, res), heads, window, shift_size=window // 2)
    x = torch.randn(batch, res, res, dim, requires_grad=True)
    cfg = {"embed_dim": dim, "depths": (1,), "num_heads": (heads,), "window_size": window, "patch_size": 1}
    (geometry,) = block_geometry(cfg, res, batch)
    mixed = precision == "bf16-mixed"
    with torch.autocast("cpu", torch.bfloat16) if mixed else contextlib.nullcontext():
        measured = _saved_bytes(block, x)
    estimate = geometry.activation_bytes(2 if mixed else 4)
    assert 0.8 < estimate / measured < 1.25, (estimate, measured)


def _plan(available, **kw):
    return plan_memory(BASE, 192, 128, "bf16-mixed", available, BASE_PARAMS, **kw)


def test_plan_picks_the_cheapest_switches_that_fit():
    roomy = _plan(1 << 50)
    assert (roomy.use_checkpoint, roomy.attn_chunk_size, roomy.fits) == (False, 0, True)
    assert roomy.message.startswith("memory=auto: est. ") and "-> no checkpointing, full attention" in roomy.message
    assert "swinv2_base at 192 px, batch 128 per process, 16-bit activations" in roomy.message

    plain = roomy.plain_peak
    tight = _plan(int(0.9 * plain / 0.6))  # the plain estimate is 1.5x over 0.6 x available
    assert (tight.use_checkpoint, tight.attn_chunk_size, tight.fits) == (True, 0, True)
    assert tight.peak < 0.6 * tight.available < plain
    assert "> 0.6 x" in tight.message and "-> checkpointing on (" in tight.message

    tighter = _plan(int((tight.peak - 1) / 0.6))  # checkpointing alone no longer fits: chunk the attention
    chunk = tighter.attn_chunk_size
    assert tighter.use_checkpoint and tighter.fits and chunk >= 1 and chunk & (chunk - 1) == 0
    assert tighter.peak <= 0.6 * tighter.available
    assert f"-> checkpointing on, attn_chunk_size={chunk} (" in tighter.message

    hopeless = _plan(1 << 20)
    assert (hopeless.use_checkpoint, hopeless.attn_chunk_size, hopeless.fits) == (True, 1, False)
    assert "lower data.batch_size" in hopeless.message


def test_plan_counts_zero_sharding_and_precision():
    one, eight = _plan(1 << 50), _plan(1 << 50, zero_world_size=8)
    assert one.plain_peak - eight.plain_peak == int(BASE_PARAMS * 8 * 7 / 8)  # AdamW moments split over 8
    fp32 = plan_memory(BASE, 192, 128, "32-true", 1 << 50, BASE_PARAMS)
    assert fp32.plain_peak > 1.8 * one.plain_peak  # 4-byte activations


def test_available_memory_on_cpu():
    total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    free = available_memory(torch.device("cpu"))
    assert 0 < free <= total
    assert available_memory(torch.device("cpu"), processes=4) == pytest.approx(free / 4, rel=0.05)


def _fit(image_folder, callbacks):
    schedule = {"name": "constant", "epochs": 1, "warmup_epochs": 0}
    return fit_tiny_pretraining(
        image_folder, schedule, callbacks, max_epochs=1, limit_train_batches=2, precision="32-true"
    )


def test_planner_applies_and_explains_its_choice_in_a_real_fit(image_folder, caplog):
    module, reference = _fit(image_folder, [])
    # a budget that needs checkpointing and attention chunks for nano at 32 px, batch 8
    args = (module.hparams.model_config, 32, 8, "32-true")
    params = sum(p.numel() for p in module.parameters())
    plain = plan_memory(*args, 1 << 50, params).plain_peak
    checkpointed = plan_memory(*args, int((plain - 1) / 0.6), params).peak
    planner = MemoryPlanner(available=int((checkpointed - 1) / 0.6))
    with caplog.at_level(logging.INFO):
        module, losses = _fit(image_folder, [planner])
    plan = planner.plan
    assert plan.use_checkpoint and plan.attn_chunk_size >= 1 and plan.fits
    assert plan.message in caplog.text
    encoder = module.model.encoder
    assert all(layer.use_checkpoint for layer in encoder.layers)
    assert all(b.attn.attn_chunk_size == plan.attn_chunk_size for layer in encoder.layers for b in layer.blocks)
    assert losses == pytest.approx(reference, abs=1e-5)  # memory switches change memory, not results


def test_recipe_rejects_unknown_memory_mode():
    with pytest.raises(RecipeError, match="memory='lots': use manual"):
        (load_recipe("pretrain", ["memory=lots"]))
