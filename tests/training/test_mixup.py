"""Mixup / CutMix targets and the soft-target cross-entropy."""

from __future__ import annotations

import math

import torch

from simmim.training.mixup import Mixup, SoftTargetCrossEntropy, smooth_one_hot


def test_smooth_one_hot():
    t = smooth_one_hot(torch.tensor([2, 0]), 4, smoothing=0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_images():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    seen = set()
    for seed in range(20):
        mix = Mixup(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, seed=seed)
        images, targets = mix(x, labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # Image 0 is mixed with image 3 (the batch reversed): its weight of class 0 (minus smoothing) is lam,
        # and the pixels say the same: mean value = 3 * (1 - lam).
        lam = (targets[0, 0] - 0.025) / 0.9
        torch.testing.assert_close(images[0].mean(), 3 * (1 - lam), atol=1e-5, rtol=0)
        cutmix = bool(((images[0] != 0) & (images[0] != 3)).sum() == 0) and lam < 1
        seen.add("cutmix" if cutmix else "mixup")
    assert seen == {"cutmix", "mixup"}


def test_mixup_off_gives_smoothed_labels():
    mix = Mixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    x = torch.randn(2, 3, 8, 8)
    images, targets = mix(x, torch.tensor([1, 2]))
    assert not mix.active and torch.equal(images, x)
    torch.testing.assert_close(targets, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    target = torch.tensor([[0.25, 0.75, 0.0]])
    z = math.log(math.e**1 + math.e**2 + 1)
    expected = -(0.25 * (1 - z) + 0.75 * (2 - z))
    assert math.isclose(SoftTargetCrossEntropy()(logits, target).item(), expected, rel_tol=1e-6)
