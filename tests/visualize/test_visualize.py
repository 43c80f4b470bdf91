import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from PIL import Image

from simmim import visualize as V
from simmim.models.attention import WindowAttention
from simmim.models.simmim import SimMIM, build_simmim

IMG = 32


class OracleSimMIM(SimMIM):
    """Predicts its own target exactly, so a correct visualisation shows the original image everywhere."""

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.target(x)


def _images(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Viewable images in [0, 1] and their ImageNet-normalised version."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, 3, IMG, IMG, generator=g)
    mean = torch.tensor(V.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(V.IMAGENET_STD).view(1, 3, 1, 1)
    return raw, (raw - mean) / std


def _model(norm_target: bool = False, oracle: bool = False) -> SimMIM:
    torch.manual_seed(0)
    m = build_simmim("swinv2_nano", img_size=IMG, norm_target=norm_target, norm_target_patch_size=7)
    if oracle:
        m.__class__ = OracleSimMIM
    return m


def test_denormalize_inverts_normalisation_and_clips():
    raw, x = _images()
    torch.testing.assert_close(V.denormalize(x), raw, atol=1e-6, rtol=0)
    assert V.denormalize(x * 10).min() >= 0 and V.denormalize(x * 10).max() <= 1


@pytest.mark.parametrize("norm_target", [False, True])
def test_perfect_prediction_is_shown_as_the_original(norm_target):
    # With NORM_TARGET the prediction is in locally normalised space: only t * local_std + local_mean followed
    # by the ImageNet un-normalisation gives the picture back (without it the result is a grey smear).
    raw, x = _images()
    recs = V.reconstruct(_model(norm_target, oracle=True), x, mask_patch_size=8)
    torch.testing.assert_close(recs.prediction, raw, atol=1e-4, rtol=0)
    torch.testing.assert_close(recs.pasted, raw, atol=1e-4, rtol=0)
    assert recs.loss.abs().max() < 1e-5
    assert ("NORM_TARGET" in recs.target_note) == norm_target


def test_pasted_keeps_visible_pixels_exactly():
    raw, x = _images()
    model = _model(norm_target=True)
    model.train()
    recs = V.reconstruct(model, x, mask_patch_size=8, mask_ratio=0.5, seed=3)
    assert model.training  # mode restored
    visible = (recs.pixel_mask == 0).expand_as(raw)
    assert visible.any() and (~visible).any()
    assert torch.equal(recs.pasted[visible], recs.original[visible])
    assert torch.equal(recs.pasted[~visible], recs.prediction[~visible])
    assert torch.all(recs.masked[~visible] == V.MASK_GREY)
    assert not torch.allclose(recs.prediction[~visible], recs.original[~visible], atol=0.05)  # untrained model
    # the per-image loss is the training loss, image by image
    target = model.target(x)
    rec = model.eval().reconstruct(x, V.fixed_masks(3, IMG, 4, 8, 0.5, 3))
    torch.testing.assert_close(recs.loss.mean(), model(x, V.fixed_masks(3, IMG, 4, 8, 0.5, 3)), rtol=1e-4, atol=0)
    torch.testing.assert_close(recs.pixel_l1, (target - rec).abs().mean(1), rtol=1e-4, atol=1e-5)


def test_fixed_masks_are_reproducible():
    a = V.fixed_masks(4, IMG, 4, 8, 0.6, seed=1)
    assert a.shape == (4, 8, 8) and a.dtype == torch.int64
    assert torch.equal(a, V.fixed_masks(4, IMG, 4, 8, 0.6, seed=1))
    assert not torch.equal(a, V.fixed_masks(4, IMG, 4, 8, 0.6, seed=2))
    assert (a.float().mean(dim=(1, 2)) == math.ceil(16 * 0.6) / 16).all()


def test_patch_loss_map_is_mean_l1_over_masked_blocks():
    _, x = _images()
    recs = V.reconstruct(_model(), x, mask_patch_size=16, mask_ratio=0.5, seed=0)
    maps = V.patch_loss_map(recs, 16)
    assert maps.shape == (3, 2, 2)
    masked_blocks = recs.pixel_mask[:, 0, ::16, ::16] == 1
    assert torch.equal(torch.isnan(maps), ~masked_blocks)
    b, i, j = (int(v) for v in masked_blocks.nonzero()[0])
    expected = recs.pixel_l1[b, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)].mean()
    torch.testing.assert_close(maps[b, i, j], expected)
    # equal-sized blocks: their mean is the image's masked L1
    torch.testing.assert_close(maps.nan_to_num(0).sum(dim=(1, 2)) / masked_blocks.sum(dim=(1, 2)), recs.loss)
    with pytest.raises(ValueError, match="divisible"):
        V.patch_loss_map(recs, 12)


def test_grid_png_has_expected_size_and_exact_tiles(tmp_path):
    raw, x = _images(3)
    path = tmp_path / "sub" / "grid.png"
    grid = V.save_reconstruction_grid(_model(), x, None, path, title="test", mask_patch_size=8)
    zoom = math.ceil(96 / IMG)
    tile = IMG * zoom
    expected = (V.TITLE_H + V.CAPTION_H + 4 * (tile + V.PAD) + V.PAD, V.LABEL_W + 3 * (tile + V.PAD) + V.PAD)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (*expected, 3)
    assert np.array_equal(png, grid)
    # second image of the "original" row is the image itself, each pixel repeated zoom x zoom
    y0, x0 = V.TITLE_H + V.CAPTION_H + V.PAD, V.LABEL_W + V.PAD + (tile + V.PAD)
    want = (raw[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(zoom, 0).repeat(zoom, 1)
    assert np.abs(png[y0 : y0 + tile, x0 : x0 + tile].astype(int) - want).max() <= 1


def test_attention_temperatures_and_position_bias_maps():
    model = _model()
    temps = V.attention_temperatures(model)
    assert list(temps) == [
        "stage 0 block 0",
        "stage 1 block 0",
        "stage 2 block 0",
        "stage 2 block 1",
        "stage 3 block 0",
    ]
    assert [len(t) for t in temps.values()] == [1, 2, 4, 4, 8]
    torch.testing.assert_close(temps["stage 0 block 0"], torch.tensor([10.0]))  # exp(log 10) at init
    with torch.no_grad():
        model.encoder.layers[1].blocks[0].attn.logit_scale.fill_(math.log(1000.0))
    torch.testing.assert_close(V.attention_temperatures(model)["stage 1 block 0"], torch.tensor([100.0, 100.0]))

    maps = V.position_bias_maps(model)
    attn: WindowAttention = model.encoder.layers[0].blocks[0].attn
    w = attn.window_size[0]
    m = maps["stage 0 block 0"]
    assert m.shape == (1, 2 * w - 1, 2 * w - 1) and (m > 0).all() and (m < 16).all()
    # offset (dy, dx) between query 0 and key (dy, dx) sits at [w - 1 + (0 - dy), w - 1 + (0 - dx)]
    bias = attn.position_bias()  # [nH, N, N]
    torch.testing.assert_close(m[0, w - 1, w - 1], bias[0, 0, 0])
    torch.testing.assert_close(m[0, w - 1 - 1, w - 1 - 2], bias[0, 0, 1 * w + 2])


# ---- the callback, checkpoints and the CLI on a real tiny run --------------------------------------------
@pytest.fixture(scope="module")
def fitted(image_folder, tmp_path_factory):
    """A 4-step fit (precision auto: bf16 where native) on 24 real PNGs with the grid callback every 2 steps, and its
    checkpoint on disk."""
    import pytorch_lightning as pl
    from conftest import pretrain_module
    from pytorch_lightning.loggers import TensorBoardLogger

    from simmim import runtime
    from simmim.data import PretrainDataModule

    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    dm = PretrainDataModule(image_folder, "folder", img_size=IMG, mask_patch_size=8, batch_size=4, num_workers=0)
    schedule = {"name": "constant", "epochs": 1, "warmup_epochs": 0}
    module = pretrain_module([f"model.img_size={IMG}", "optim.lr=0.5"], schedule, batch_size=4)
    callback = V.ReconstructionGridCallback(every_n_steps=2, num_images=3)
    trainer = quiet_trainer(
        max_epochs=1,
        max_steps=4,
        precision=runtime.resolve_precision("auto", "cpu").value,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="logs"),
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(root / "last.ckpt")
    return trainer, module, callback, root


def test_callback_logs_fixed_grids_during_fit(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, module, callback, _ = fitted
    folder = Path(trainer.log_dir) / "reconstructions"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert module.training  # the callback put the model back in training mode
    first, last = (np.asarray(Image.open(folder / n)) for n in ("step_000000.png", "step_000004.png"))
    tile = IMG * math.ceil(96 / IMG)
    assert first.shape == (
        V.TITLE_H + V.CAPTION_H + 4 * (tile + V.PAD) + V.PAD,
        V.LABEL_W + 3 * (tile + V.PAD) + V.PAD,
        3,
    )
    # same images and masks at every step (original and masked rows identical); the prediction changed
    rows = V.TITLE_H + V.CAPTION_H + V.PAD + 2 * (tile + V.PAD)
    assert np.array_equal(first[V.TITLE_H + V.CAPTION_H : rows], last[V.TITLE_H + V.CAPTION_H : rows])
    assert not np.array_equal(first[rows:], last[rows:])
    # the datamodule's own masks for those images were used
    assert callback.masks.shape == (3, IMG // 4, IMG // 4)
    assert torch.equal(callback.masks, torch.stack([trainer.datamodule.train_set[i]["mask"] for i in range(3)]))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("reconstructions")] == [0, 2, 4]


def test_load_simmim_from_lightning_and_plain_files(fitted, image_folder, tmp_path):
    _, module, _, root = fitted
    model, info = V.load_simmim(root / "last.ckpt")
    assert info.pop("datamodule")["root"] == image_folder
    assert info == {
        "img_size": IMG,
        "mask_patch_size": 8,
        "mask_ratio": 0.6,
        "mean": tuple(V.IMAGENET_MEAN),
        "std": tuple(V.IMAGENET_STD),
    }
    _, x = _images(2)
    masks = V.fixed_masks(2, IMG, 4, 8, 0.6, 0)
    with torch.no_grad():
        expected = module.model.eval().reconstruct(x, masks)
        torch.testing.assert_close(model.reconstruct(x, masks), expected)
    plain = tmp_path / "simmim.pt"
    torch.save({"state_dict": module.model.state_dict(), "model_config": module.hparams.model_config}, plain)
    with torch.no_grad():
        torch.testing.assert_close(V.load_simmim(plain)[0].reconstruct(x, masks), expected)


def test_cli_writes_grid_from_checkpoint(fitted, image_folder, tmp_path):
    import subprocess
    import sys

    _, _, _, root = fitted
    out = tmp_path / "grid.png"
    files = sorted(image_folder.iterdir())[:2]
    proc = subprocess.run(
        [sys.executable, "-m", "simmim.visualize", str(root / "last.ckpt"), *map(str, files), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    tile = IMG * math.ceil(96 / IMG)  # the checkpoint's 32 px, from its datamodule hyper-parameters
    expected = (V.TITLE_H + V.CAPTION_H + 4 * (tile + V.PAD) + V.PAD, V.LABEL_W + 2 * (tile + V.PAD) + V.PAD)
    assert Image.open(out).size == expected[::-1]


def test_cli_errors_are_one_line(fitted, image_folder, tmp_path, capsys):
    _, _, _, root = fitted
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing.ckpt"), str(image_folder)], "missing.ckpt does not exist"),
        ([str(bad), str(image_folder)], "broken.png is not a checkpoint (it looks like a text file)"),
        ([str(root / "last.ckpt"), str(bad)], "cannot read image"),
        ([str(root / "last.ckpt"), str(tmp_path / "empty")], "holds no image files"),
        ([str(root / "last.ckpt"), str(image_folder), "--mask-patch-size", "12"], "not divisible"),
    ]
    for args, text in cases:
        assert V.main([*args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert text in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_cli_skips_unreadable_images_with_a_warning(fitted, image_folder, tmp_path, capsys):
    _, _, _, root = fitted
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted(image_folder.iterdir())[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "corrupt.png").write_bytes(b"not a png")  # sorts first: it is among the images shown
    out = tmp_path / "grid.png"
    assert V.main([str(root / "last.ckpt"), str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: skipping unreadable image ") and captured.err.count("\n") == 1
    assert str(folder / "corrupt.png") in captured.err
    assert "wrote" in captured.out and "(3 images" in captured.out
    tile = IMG * math.ceil(96 / IMG)
    assert Image.open(out).size[0] == V.LABEL_W + 3 * (tile + V.PAD) + V.PAD
    # --max-images reads no further than it shows: only readable images count
    assert V.main([str(root / "last.ckpt"), str(folder), "--out", str(out), "--max-images", "2"]) == 0
    assert "(2 images" in capsys.readouterr().out


def test_cli_flag_errors_name_the_flags(fitted, image_folder, tmp_path, capsys):
    _, _, _, root = fitted
    cases = [
        (["--max-images", "0"], "--max-images must be >= 1, got 0"),
        (["--img-size", "30"], "--img-size 30 is not divisible by --mask-patch-size 8 (the checkpoint's)"),
        (["--mask-ratio", "1.5"], "--mask-ratio 1.5 must lie strictly between 0 and 1"),
        (["--mask-ratio", "0"], "--mask-ratio 0.0 must lie strictly between 0 and 1"),
        (["--img-size", "36", "--mask-patch-size", "6"], "--mask-patch-size 6 is not divisible by the model's patch"),
    ]
    for flags, text in cases:
        assert V.main([str(root / "last.ckpt"), str(image_folder), "--out", str(tmp_path / "x.png"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
