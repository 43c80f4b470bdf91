"""simmim.models.layers: the effective-window rule, the shifted-window mask against the official construction,
window partitioning, patch merging."""

import pytest
import torch

from simmim.models.layers import (
    MASK_VALUE,
    PatchMerging,
    clip_window,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


def test_clip_window_is_the_official_rule():
    assert clip_window((48, 48), (12, 12), (6, 6)) == ((12, 12), (6, 6))
    assert clip_window((12, 12), (12, 12), (6, 6)) == ((12, 12), (0, 0))  # no larger than the window: one window
    assert clip_window((6, 6), (12, 12), (6, 6)) == ((6, 6), (0, 0))
    assert clip_window((5, 9), (7, 7), (3, 3)) == ((5, 5), (0, 0))  # the smaller side decides


@pytest.mark.parametrize("res,window,shift", [(8, 4, 2), (12, 6, 3), (16, 4, 2)])
def test_shifted_window_mask_equals_the_official_one(res, window, shift):
    """Official construction (SwinTransformerBlock.__init__): 9 regions by slices, partitioned, -100 where the
    region ids of query and key differ."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = window_partition(img, (window, window)).squeeze(-1)
    diff = mw.unsqueeze(1) - mw.unsqueeze(2)
    official = diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0)
    ours = shifted_window_mask(res, res, (window, window), (shift, shift)).dense()
    assert torch.equal(ours, official)
    assert shifted_window_mask(res, res, (window, window), (0, 0)) is None  # no shift, no padding: no mask


def test_window_partition_round_trip_and_patch_merging_order():
    x = torch.randn(2, 8, 12, 3)
    assert torch.equal(window_reverse(window_partition(x, (4, 4)), (4, 4), 8, 12), x)
    merge = PatchMerging((4, 4), dim=1)
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(2, 4))  # keep x0 = [0::2, 0::2] and x1 = [1::2, 0::2]
        merge.norm.weight.fill_(1.0)
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    out = merge(grid)
    centred = torch.stack([grid[0, 0::2, 0::2, 0], grid[0, 1::2, 0::2, 0]], -1)
    expect = torch.nn.functional.layer_norm(centred, (2,), eps=1e-5)
    assert torch.allclose(out[0], expect, atol=1e-5)
