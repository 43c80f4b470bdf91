import math

import pytest
import pytorch_lightning as pl
import torch

from simmim.models import create_model
from simmim.models.simmim import build_simmim
from simmim.training.optim import (
    LRSchedule,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    fused_adamw_ok,
    param_groups,
    scale_lr,
)


def _decay_of(groups):
    return {n: g["weight_decay"] for g in groups for n in g["param_names"]}


@pytest.fixture(scope="module")
def simmim_model():
    return build_simmim("swinv2_nano", img_size=32)


def test_no_decay_rules_official_bug_on(simmim_model):
    wd = _decay_of(param_groups(simmim_model, 0.05, official_wd_exemption_bug=True))
    assert len(wd) == len(list(simmim_model.parameters()))
    # exempt: mask_token (full-name match), 1-D params, biases
    assert wd["encoder.mask_token"] == 0.0
    assert wd["encoder.layers.0.blocks.0.attn.q_bias"] == 0.0
    assert wd["encoder.layers.0.blocks.0.norm1.weight"] == 0.0
    assert wd["decoder.0.bias"] == 0.0
    # the official prefixing bug: `encoder.cpb_mlp` / `encoder.logit_scale` never match, so these decay
    assert wd["encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"] == 0.05
    assert wd["encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight"] == 0.05
    assert wd["encoder.layers.0.blocks.0.attn.logit_scale"] == 0.05
    assert wd["encoder.layers.0.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["decoder.0.weight"] == 0.05


def test_no_decay_rules_fixed(simmim_model):
    wd = _decay_of(param_groups(simmim_model, 0.05, official_wd_exemption_bug=False))
    assert wd["encoder.mask_token"] == 0.0
    assert wd["encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"] == 0.0
    assert wd["encoder.layers.2.blocks.1.attn.cpb_mlp.2.weight"] == 0.0
    assert wd["encoder.layers.0.blocks.0.attn.logit_scale"] == 0.0
    assert wd["encoder.layers.0.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["encoder.layers.0.downsample.reduction.weight"] == 0.05
    on = _decay_of(param_groups(simmim_model, 0.05, official_wd_exemption_bug=True))
    changed = {n for n in wd if wd[n] != on[n]}
    assert changed == {n for n in wd if "cpb_mlp" in n and n.endswith("weight") or n.endswith("logit_scale")}


def test_layer_decay_scales_follow_the_official_rule():
    model = create_model("swinv2_nano", img_size=32, num_classes=10)  # depths 1,1,2,1: L = 7 layer ids
    ld = 0.5
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=ld) for n in g["param_names"]}
    expect_id = {
        "patch_embed.proj.weight": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1,
        "layers.0.downsample.reduction.weight": 1,  # sum(depths[:1])
        "layers.1.blocks.0.mlp.fc1.weight": 2,
        "layers.1.downsample.norm.weight": 2,
        "layers.2.blocks.0.norm1.bias": 3,
        "layers.2.blocks.1.attn.cpb_mlp.0.weight": 4,
        "layers.2.downsample.reduction.weight": 4,
        "layers.3.blocks.0.mlp.fc2.weight": 5,
        "norm.weight": 6,
        "head.weight": 6,
    }
    for name, lid in expect_id.items():
        assert scales[name] == pytest.approx(ld ** (7 - 1 - lid)), name
    # applied once: group lr = lr * scale, and the scheduler does not multiply again
    opt = build_optimizer(model, lr=1.0, layer_decay=ld)
    sched = build_scheduler(opt, LRSchedule(total_steps=10, name="constant"))
    for _ in range(3):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["lr_scale"])


def test_layer_decay_through_the_simmim_wrapper(simmim_model):
    groups = param_groups(simmim_model, 0.05, layer_decay=0.9)
    scales = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scales["encoder.mask_token"] == pytest.approx(0.9**6)
    assert scales["decoder.0.weight"] == 1.0


def test_cosine_schedule_values():
    s = LRSchedule(total_steps=100, warmup_steps=10, warmup_lr=0.1, min_lr=0.01, name="cosine")
    assert s(0, 1.0) == pytest.approx(0.1)
    assert s(5, 1.0) == pytest.approx(0.55)
    assert s(10, 1.0) == pytest.approx(1.0)
    assert s(55, 1.0) == pytest.approx(0.01 + 0.5 * 0.99)  # half way through the cosine (warmup prefix)
    assert s(100, 1.0) == pytest.approx(0.01)
    assert s(130, 1.0) == pytest.approx(0.01)


def test_multistep_schedule_values():
    s = LRSchedule(total_steps=800, warmup_steps=10, warmup_lr=5e-7, name="multistep", milestones=(700,), gamma=0.1)
    assert s(0, 1e-4) == pytest.approx(5e-7)
    assert s(699, 1e-4) == pytest.approx(1e-4)
    assert s(700, 1e-4) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="after the first milestone"):
        LRSchedule(total_steps=10, warmup_steps=8, name="multistep", milestones=(5,))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule(total_steps=10, name="linear")


def test_scheduler_per_group_peaks_and_unscaled_floors():
    """As timm 0.4.12 in the official code: each group warms up from warmup_lr to its own peak (lr * scale)."""
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.5}])
    sched = build_scheduler(opt, LRSchedule(total_steps=20, warmup_steps=4, warmup_lr=0.2, min_lr=0.0))
    seen = []
    for _ in range(21):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.2, 0.2])
    assert seen[2] == pytest.approx([0.6, 0.35])
    assert seen[4] == pytest.approx([1.0, 0.5])
    assert seen[12] == pytest.approx([0.5 * (1 + math.cos(math.pi * 8 / 16)), 0.25 * (1 + math.cos(math.pi * 8 / 16))])
    assert seen[20] == pytest.approx([0.0, 0.0])
    assert "lr_lambdas" in sched.state_dict() and all(x is None for x in sched.state_dict()["lr_lambdas"])


def test_linear_scaling_rule():
    assert scale_lr(1e-4, 2048) == pytest.approx(4e-4)
    assert scale_lr(5e-7, 128 * 2 * 4) == pytest.approx(5e-7 * 2)


class _Clipped(pl.LightningModule):
    """A linear model whose loss gives gradients far above the clip value; records the norm each update used."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 4)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        return 1e3 * self.lin(batch[0]).square().mean()

    def configure_optimizers(self):
        return build_optimizer(self.lin, lr=1e-3, fused=fused_adamw_ok(self.trainer))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_end(self, *_):  # the gradients the step used stay until the next step's zero_grad
        self.seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()])).item())


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_is_used_and_its_gradients_are_clipped(precision, tmp_path):
    # Lightning alone raises for a fused optimizer with gradient_clip_val under bf16-mixed; ours clips by norm.
    data = torch.utils.data.TensorDataset(torch.randn(12, 16) * 10)
    module = _Clipped()
    trainer = pl.Trainer(
        max_steps=3, precision=precision, gradient_clip_val=0.5, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.optimizers[0].param_groups[0]["fused"] is True
    assert len(module.seen) == 3 and all(n == pytest.approx(0.5, rel=1e-4) for n in module.seen)


def test_fused_adamw_is_off_under_an_fp16_grad_scaler(tmp_path):
    from pytorch_lightning.plugins import MixedPrecision

    kw = dict(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    scaler = torch.amp.GradScaler("cpu")  # Lightning adds one for 16-mixed on CUDA
    assert not fused_adamw_ok(pl.Trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kw))
    assert fused_adamw_ok(pl.Trainer(precision="bf16-mixed", **kw))
