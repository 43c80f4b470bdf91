"""SwinV2 encoder: equivalence with timm in float64, memory savers, padding without leaks, transfer, bf16,
stages of any number and layer ids."""

import math

import pytest
import torch
from model_helpers import TINY, forward_backward, grads, randomise, rel_err
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from timm.models.swin_transformer_v2 import SwinTransformerV2Block as TimmBlock

from simmim import runtime
from simmim.models import SwinTransformerV2, create_model
from simmim.models.attention import LOG_MAX_SCALE
from simmim.models.convert import official_to_timm
from simmim.models.layers import DropPath
from simmim.models.swinv2 import SwinTransformerBlock

# (img_size, window, depths, pretrained_window_sizes): shifted stages, windows clipped to the stage (8 -> 4 -> 2),
# pretrained windows smaller and larger than the current ones.
TIMM_CASES = [
    (64, 4, (2, 2, 2, 2), (0, 0, 0, 0)),
    (96, 6, (2, 2, 2, 2), (4, 4, 4, 2)),
    (64, 8, (2, 2, 1, 1), (12, 6, 0, 0)),
]


@pytest.mark.parametrize("img,window,depths,pws", TIMM_CASES)
def test_matches_timm_float64_outputs_and_gradients(img, window, depths, pws):
    kw = dict(TINY, img_size=img, window_size=window, depths=depths, pretrained_window_sizes=pws)
    torch.manual_seed(0)
    ours = randomise(SwinTransformerV2(**kw)).double()
    theirs = TimmSwinV2(**kw).double()
    theirs.load_state_dict(official_to_timm(ours.state_dict()))
    x, w = torch.randn(2, 3, img, img, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    y_ours, gx_ours = forward_backward(ours, x, w)
    y_timm, gx_timm = forward_backward(theirs, x, w)
    assert rel_err(y_ours, y_timm) <= 1e-10
    assert rel_err(gx_ours, gx_timm) <= 1e-10
    g_timm = grads(theirs)
    for name, g in official_to_timm(grads(ours)).items():
        assert rel_err(g, g_timm[name]) <= 1e-10, name
    # the clamp was exercised: some logit scales exceed log(100) and get no gradient
    scales = [m.logit_scale for m in ours.modules() if hasattr(m, "logit_scale")]
    assert any((s > LOG_MAX_SCALE).any() for s in scales)
    assert all((s.grad[s > LOG_MAX_SCALE] == 0).all() for s in scales)


@pytest.mark.parametrize("img", [64, 52])  # 52 px: stages of 13, 7, 4 tokens, padded to the window
def test_checkpointing_and_sequential_attention_change_nothing(img):
    kw = dict(TINY, img_size=64, window_size=4, depths=(2, 2, 2, 1))
    torch.manual_seed(0)
    plain = randomise(SwinTransformerV2(**kw)).double()
    x, w = torch.randn(2, 3, img, img, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    y0, gx0 = forward_backward(plain, x, w)
    g0 = grads(plain)
    for ckpt, chunk in ((True, 0), (False, 3), (True, 7)):
        model = SwinTransformerV2(**kw, use_checkpoint=ckpt, attn_chunk_size=chunk).double()
        model.load_state_dict(plain.state_dict())
        y, gx = forward_backward(model, x, w)
        assert rel_err(y, y0) <= 1e-12 and rel_err(gx, gx0) <= 1e-12, (ckpt, chunk)
        for name, g in grads(model).items():
            assert rel_err(g, g0[name]) <= 1e-12, (ckpt, chunk, name)
    # switching at run time works too, and eval (no grad) runs the chunks without recomputation
    model.set_grad_checkpointing(False)
    model.set_attn_chunk_size(2)
    with torch.no_grad():
        assert rel_err(model.eval()(x), plain.eval()(x)) <= 1e-12


def _block(res: int, window: int, shift: int, pws: int = 0) -> SwinTransformerBlock:
    torch.manual_seed(0)
    return randomise(SwinTransformerBlock(8, (res, res), 2, window, shift, pretrained_window_size=pws)).double()


def test_padded_keys_are_ignored():
    """A 6x6 input with window 4 pads to 8x8. The full top-left window must equal the block run on that crop
    alone; the 2x2 bottom-right remainder must equal a block whose window is exactly 2x2 (same weights; the
    pretrained window 4 keeps the position bias of the shared offsets identical)."""
    block = _block(6, 4, 0, pws=4)
    x = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    y = block(x)
    assert rel_err(y[:, :4, :4], block(x[:, :4, :4])) <= 1e-13
    small = _block(2, 4, 0, pws=4)
    assert small.window_size == (2, 2)
    small.load_state_dict(block.state_dict())
    assert rel_err(y[:, 4:, 4:], small(x[:, 4:, 4:])) <= 1e-13


def _influence(block: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """How much the first row/column of the output depends on the last row/column of the input (the image's
    opposite edges), relative to the total dependence."""
    x = x.clone().requires_grad_(True)
    y = block(x)
    (gr,) = torch.autograd.grad(y[:, 0].sum(), x, retain_graph=True)
    (gc,) = torch.autograd.grad(y[:, :, 0].sum(), x)
    return (gr[:, -1].abs().max() / gr.abs().max()).item(), (gc[:, :, -1].abs().max() / gc.abs().max()).item()


def test_shifted_windows_do_not_leak_across_the_border_when_padding():
    """5x5 tokens, window 4, shift 2: padding (3) exceeds the shift. Padding *then* rolling keeps the wrapped-around
    rows in their own masked region; timm rolls first and lets the top row attend to the bottom one (#2438)."""
    block = _block(5, 4, 2)
    assert block.shift_size == (2, 2)
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    # exp(-100) masking: influence exp(-100 + logit range) instead of exactly 0
    assert max(_influence(block, x)) < 1e-20
    timm = TimmBlock(8, (5, 5), 2, window_size=4, shift_size=2).double()
    timm.load_state_dict(block.state_dict(), strict=False)
    assert min(_influence(timm, x)) > 1e-3, "timm no longer leaks: update the docstring of simmim.models.swinv2"


def test_any_input_size_and_stage_shapes():
    model = create_model("swinv2_nano", img_size=64, num_classes=3).eval()
    with torch.no_grad():
        for h, w in ((64, 64), (50, 38), (96, 70)):
            f = model.forward_features(torch.randn(1, 3, h, w))
            assert f.shape == (1, math.ceil(h / 32), math.ceil(w / 32), model.num_features)
            assert torch.isfinite(f).all()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_transfer_to_larger_windows_without_interpolation():
    """Weights of a 32 px / window 4 model load as they are into 64 px / window 8 with pretrained_window_sizes
    set to the old (effective) windows; the position bias of every old offset is unchanged."""
    kw = dict(TINY, depths=(2, 2), num_heads=(2, 2))
    torch.manual_seed(0)
    small = SwinTransformerV2(**kw, img_size=32, window_size=4, pretrained_window_sizes=(0, 0))
    eff = [blk.window_size[0] for layer in small.layers for blk in layer.blocks][::2]
    assert eff == [4, 4]  # stage 1 (4x4 tokens) clipped to its size
    big = SwinTransformerV2(**kw, img_size=64, window_size=8, pretrained_window_sizes=eff)
    big.load_state_dict(small.state_dict())  # strict: same keys, no buffers to resize
    for stage in range(2):
        a = small.layers[stage].blocks[0].attn.position_bias()
        b = big.layers[stage].blocks[0].attn.position_bias()  # [nH, 64, 64] over an 8x8 window
        top_left = (torch.arange(4)[:, None] * 8 + torch.arange(4)).flatten()
        assert torch.allclose(b[:, top_left][:, :, top_left], a, atol=1e-6)


def test_fresh_blocks_are_identities_and_stochastic_depth():
    model = create_model("swinv2_nano", img_size=32)
    for layer in model.layers:
        for blk in layer.blocks:
            for norm in (blk.norm1, blk.norm2):
                assert not norm.weight.any() and not norm.bias.any()
            x = torch.randn(2, *blk.input_resolution, blk.dim)
            assert torch.equal(blk(x), x)  # res-post-norm: each branch starts at exactly 0
    dpr = [
        blk.drop_path.drop_prob for layer in model.layers for blk in layer.blocks if isinstance(blk.drop_path, DropPath)
    ]
    assert dpr == pytest.approx([0.1 * i / 4 for i in range(1, 5)])  # linspace(0, 0.1, 5), first one is 0
    drop = DropPath(0.5).train()
    out = drop(torch.ones(1000, 3))
    kept = out[:, 0] != 0
    assert 350 < kept.sum() < 650 and torch.equal(out[kept], torch.full_like(out[kept], 2.0))
    assert torch.equal(drop.eval()(out), out)


def test_bfloat16_autocast_is_as_accurate_as_timm():
    """Under CPU bf16 autocast the features stay within about timm's bf16 error of the float32 result; gradients
    are finite. (Norms, temperature and softmax accumulate in float32.)"""
    kw = dict(TINY, img_size=64, window_size=8, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8))
    torch.manual_seed(0)
    ours = randomise(SwinTransformerV2(**kw))
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "logit_scale"):
                m.logit_scale.fill_(math.log(10.0))  # the init value; the clamp would hide the differences
    theirs = TimmSwinV2(**kw)
    theirs.load_state_dict(official_to_timm(ours.state_dict()))
    x = torch.randn(4, 3, 64, 64)
    errs = {}
    for name, model in (("ours", ours), ("timm", theirs)):
        ref = model.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_features(x)
        errs[name] = rel_err(low.float(), ref)
    assert errs["ours"] < 2 * errs["timm"] + 1e-3, errs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ours(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_reference_path_equals_the_kernels_in_float64():
    """The attention as written out in WindowAttention.attend (what runs under runtime.reference_kernels, e.g. for
    ONNX export) gives the model the fused CPU kernels give it, outputs and gradients."""
    kw = dict(TINY, img_size=52, window_size=4, depths=(2, 2, 2, 1))
    torch.manual_seed(0)
    fused = randomise(SwinTransformerV2(**kw)).double()
    plain = SwinTransformerV2(**kw).double()
    plain.load_state_dict(fused.state_dict())
    x, w = torch.randn(2, 3, 52, 52, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    with runtime.overridden(cpu_attention=True):
        y0, gx0 = forward_backward(fused, x, w)
    with runtime.reference_kernels():
        y1, gx1 = forward_backward(plain, x, w)
    assert rel_err(y1, y0) <= 1e-12 and rel_err(gx1, gx0) <= 1e-12
    g0 = grads(fused)
    for name, g in grads(plain).items():
        assert rel_err(g, g0[name]) <= 1e-12, name


def test_every_linear_layer_is_a_module_call():
    """Forward hooks see every projection (qkv, proj, fc1, fc2, reduction, the Log-CPB MLP and the head), and an
    adapter that wraps nn.Linear modules (as LoRA does) changes the output through each of them."""
    torch.manual_seed(0)
    model = randomise(create_model("swinv2_nano", img_size=32, num_classes=3)).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = {n.rsplit(".", 1)[-1] for n in linears}
    assert {"qkv", "proj", "fc1", "fc2", "reduction", "head"} <= names
    called = set()
    for name, m in linears.items():
        m.register_forward_hook(lambda m, args, out, name=name: called.add(name))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert called == set(linears)

    class LowRank(torch.nn.Module):  # a LoRA-style wrapper: base(x) + B(A(x))
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.a = torch.nn.Linear(base.in_features, 2, bias=False)
            self.b = torch.nn.Linear(2, base.out_features, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.b(self.a(x))

    attn = model.layers[0].blocks[0].attn
    attn.qkv = LowRank(attn.qkv)
    with torch.no_grad():
        attn.qkv.b.weight.zero_()  # as LoRA starts: the wrapped model is the model
        assert torch.equal(model(x), before)
        attn.qkv.b.weight.fill_(0.1)
        assert not torch.allclose(model(x), before)


def test_fewer_stages_with_the_official_default_pretrained_windows():
    """pretrained_window_sizes defaults to the official [0, 0, 0, 0], which also serves models of fewer stages; a
    list too short for the stages, or one naming windows for stages the model does not have, is refused."""
    model = SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    assert model.pretrained_window_sizes == (0, 0) and model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert SwinTransformerV2(img_size=32, depths=(2,), num_heads=(2,), pretrained_window_sizes=[4, 0, 0, 0])
    for bad in ((4,), (4, 4, 4)):
        with pytest.raises(ValueError, match="pretrained_window_sizes"):
            SwinTransformerV2(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), pretrained_window_sizes=bad)
