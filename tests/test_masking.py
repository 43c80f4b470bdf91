import numpy as np
import pytest

from simmim.masking import MaskGenerator


def test_official_geometry_counts_and_blocks():
    gen = MaskGenerator(192, 32, 4, 0.6)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (48, 48) and mask.dtype == np.int64
    cells = mask.reshape(6, 8, 6, 8)
    # every 8x8 patch block (one 32-px cell) is uniform
    assert (cells == cells[:, :1, :, :1]).all()
    assert cells[:, 0, :, 0].sum() == 22  # ceil(36 * 0.6)
    assert set(np.unique(mask)) == {0, 1}


@pytest.mark.parametrize("size, mp, ratio", [(32, 8, 0.6), (64, 16, 0.5), (96, 32, 0.75), (32, 4, 0.3)])
def test_count_is_ceil_of_ratio(size, mp, ratio):
    gen = MaskGenerator(size, mp, 4, ratio)
    cells = (size // mp) ** 2
    for seed in range(5):
        mask = gen(np.random.default_rng(seed))
        assert mask.sum() == int(np.ceil(cells * ratio)) * (mp // 4) ** 2


def test_seeded_reproducible_and_varied():
    gen = MaskGenerator(64, 16, 4, 0.6)
    a, b = gen(np.random.default_rng(1)), gen(np.random.default_rng(1))
    assert (a == b).all()
    masks = np.stack([gen(np.random.default_rng(s)) for s in range(200)])
    assert len({m.tobytes() for m in masks}) > 100
    # every cell is masked with probability ~ ratio
    freq = masks.reshape(200, 4, 4, 4, 4)[:, :, 0, :, 0].mean(0)
    assert np.abs(freq - 10 / 16).max() < 0.15


@pytest.mark.parametrize(
    "args, text",
    [
        ((100, 32, 4, 0.6), "not divisible by mask_patch_size 32"),
        ((180, 30, 4, 0.6), "mask_patch_size 30 is not divisible"),
        ((192, 32, 4, 0.0), "mask_ratio must lie in (0, 1)"),
        ((192, 32, 4, 1.0), "mask_ratio must lie in (0, 1)"),
    ],
)
def test_size_errors(args, text):
    with pytest.raises(ValueError) as e:
        MaskGenerator(*args)
    assert text in str(e.value)
