"""simmim.models.targets: masked L1, pixel masks and NORM_TARGET against hand computations and the official code."""

import pytest
import torch
import torch.nn.functional as F

from simmim.models.targets import masked_l1, norm_targets, upsample_mask


def test_masked_l1_hand_computed():
    target = torch.zeros(1, 3, 2, 2)
    rec = torch.full((1, 3, 2, 2), 100.0)  # unmasked pixels: ignored whatever they hold
    rec[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # |.| sums to 6
    rec[0, :, 1, 1] = torch.tensor([-1.0, 0.0, 1.0])  # |.| sums to 2
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # official: sum(|x - rec| * mask) / (sum(mask) + 1e-5) / in_chans = 8 / 2.00001 / 3
    assert masked_l1(target, rec, mask).item() == pytest.approx(8 / 2.00001 / 3, rel=1e-6)
    per = masked_l1(target.repeat(2, 1, 1, 1), rec.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1), per_sample=True)
    assert torch.allclose(per, torch.full((2,), 8 / 2.00001 / 3))


def test_upsample_mask_repeats_each_patch():
    m = torch.tensor([[[1, 0], [0, 1]]])
    up = upsample_mask(m, 4)
    assert up.shape == (1, 1, 8, 8)
    assert up[0, 0, :4, :4].eq(1).all() and up[0, 0, :4, 4:].eq(0).all() and up[0, 0, 4:, 4:].eq(1).all()


def test_norm_targets_matches_direct_per_pixel():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    k = 5
    t, mean, std = norm_targets(x, k, return_stats=True)
    expect = torch.empty_like(x)
    for c in range(2):
        for i in range(7):
            for j in range(9):
                nb = x[0, c, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].flatten()  # in-image neighbours only
                var = nb.var(unbiased=True)
                expect[0, c, i, j] = (x[0, c, i, j] - nb.mean()) / (var + 1e-6).sqrt()
    assert t.dtype == torch.float64 and torch.allclose(t, expect, rtol=0, atol=1e-10)
    for bad in (4, 1):
        with pytest.raises(ValueError, match="must be odd and at least 3"):
            norm_targets(x, bad)


@pytest.mark.parametrize("k", [47, 15, 3])
def test_norm_targets_equal_the_official_2d_pooling(k):
    """Our separable box means give the official code's 2-D avg_pool2d formula, also where the neighbourhood is
    larger than the image (47 px on 40 x 52)."""
    x = torch.rand(2, 3, 40, 52, dtype=torch.float64)
    mean = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
    var = F.avg_pool2d(x**2, k, 1, k // 2, count_include_pad=False) - mean**2
    n = F.avg_pool2d(torch.ones_like(x), k, 1, k // 2, count_include_pad=True) * k**2
    official = (x - mean) / (var * n / (n - 1)).clamp(min=0.0).add(1e-6).sqrt()
    assert torch.allclose(norm_targets(x, k), official, rtol=0, atol=1e-10)


def test_loss_keeps_float64_and_lifts_half_precision():
    target, rec = torch.rand(1, 3, 4, 4, dtype=torch.float64), torch.rand(1, 3, 4, 4, dtype=torch.float64)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.long)
    assert masked_l1(target, rec, mask).dtype == torch.float64
    assert masked_l1(target.bfloat16(), rec.bfloat16(), mask).dtype == torch.float32
    assert norm_targets(target, 3).dtype == torch.float64 and norm_targets(target.half(), 3).dtype == torch.float32
