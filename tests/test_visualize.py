import math

import numpy as np
import pytest
import torch
from PIL import Image

from simmim import visualize as V
from simmim.models.simmim import SimMIM, build_simmim
from simmim.models.swinv2 import WindowAttention

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
