"""SimMIM: the loss is the official formula (in float32, and exactly in float64), and float32 under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from simmim.models import build_simmim
from simmim.models.targets import norm_targets


@pytest.mark.parametrize("norm_target", [False, True])
def test_model_loss_is_the_official_formula(norm_target):
    torch.manual_seed(0)
    model = build_simmim("swinv2_nano", img_size=32, norm_target=norm_target, norm_target_patch_size=7).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 8, 8) > 0.5).long()
    with torch.no_grad():
        loss = model(x, mask)
        rec = model.reconstruct(x, mask)
    target = norm_targets(x, 7) if norm_target else x
    m = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    expect = ((target - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3
    assert torch.allclose(loss, expect, rtol=1e-5)


def test_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_simmim("swinv2_nano", img_size=32)
    x, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 8, 8) > 0.5).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _official_loss(x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor, norm_target_patch: int = 0):
    """microsoft/Swin-Transformer models/simmim.py, SimMIM.forward, written out (NORM_TARGET with 2-D pooling)."""
    if norm_target_patch:
        k = norm_target_patch
        mean = F.avg_pool2d(x, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        mean_sq = F.avg_pool2d(x**2, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        count = F.avg_pool2d(torch.ones_like(x), kernel_size=k, stride=1, padding=k // 2, count_include_pad=True) * k**2
        var = ((mean_sq - mean**2) * (count / (count - 1))).clamp(min=0.0)
        x = (x - mean) / (var + 1.0e-6) ** 0.5
    mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / 3


@pytest.mark.parametrize("norm_target", [False, True])
def test_float64_loss_is_the_official_formula_to_1e_12(norm_target):
    """In float64 the loss stays float64 (no cast to float32 on the way) and equals the official formula written
    out, for raw and locally normalised targets."""
    torch.manual_seed(0)
    model = build_simmim("swinv2_nano", img_size=32, norm_target=norm_target, norm_target_patch_size=7)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = (torch.rand(2, 8, 8) > 0.5).long()
    with torch.no_grad():
        loss = model(x, mask)
        x_rec = model.decoder(model.encoder(x, mask))
    expect = _official_loss(x, x_rec, mask, 7 if norm_target else 0)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expect.item()) <= 1e-12 * abs(expect.item())
