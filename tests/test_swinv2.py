"""SwinV2 encoder: equivalence with timm in float64, memory savers, padding without leaks, transfer, bf16."""

import math

import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from timm.models.swin_transformer_v2 import SwinTransformerV2Block as TimmBlock

import simmim.models.swinv2 as swinv2
from simmim.models.convert import official_to_timm
from simmim.models.swinv2 import (
    LOG_MAX_SCALE,
    MODEL_CONFIGS,
    DropPath,
    SwinTransformerBlock,
    SwinTransformerV2,
    _cosine_window_attention_backward,
    _sdpa_attention,
    cosine_window_attention,
    create_model,
    swin_layer_id,
)

TINY = dict(patch_size=4, embed_dim=16, num_heads=(2, 2, 4, 4), num_classes=5, drop_path_rate=0.0)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: the zero-initialised post-norms, q/v biases and logit scales (some above the
    log(100) clamp) get random values, so every term of the attention and every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 5 + 1)
            elif "norm" in name or "q_bias" in name or "v_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + ("weight" in name))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output, and the gradient of a random projection of it w.r.t. the input (parameter grads accumulate)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * w).sum().backward()
    return y.detach(), x.grad


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


def test_eval_position_bias_cache_follows_weight_updates():
    torch.manual_seed(0)
    model = randomise(create_model("swinv2_nano", img_size=32)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y1 = model(x)
        assert torch.equal(model(x), y1)
        for m in model.modules():
            if hasattr(m, "cpb_mlp"):
                m.cpb_mlp[2].weight.mul_(3.0)
        y2 = model(x)
    fresh = create_model("swinv2_nano", img_size=32).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(y1, y2) and torch.equal(y2, fresh(x))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_op_registration(dtype):
    """The custom op's fake kernels, schema and autograd registration agree with its real outputs (what
    torch.compile relies on), for float32 and for bfloat16 inputs with a float32 bias (autocast)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 9, 24, generator=g).to(dtype).requires_grad_(True)
    scale = (torch.rand(2, 1, 1, generator=g) * 20).requires_grad_(True)
    bias = torch.randn(6, 9, 9, generator=g).requires_grad_(True)
    torch.library.opcheck(cosine_window_attention, (qkv, scale, bias))
    with torch.no_grad():
        out, heads, norms, attn = cosine_window_attention(qkv, scale, bias)
    torch.library.opcheck(
        _cosine_window_attention_backward, (torch.randn_like(out), heads, scale.detach(), norms, attn)
    )


def test_configs_layer_ids_and_errors():
    assert {"swinv2_tiny", "swinv2_base", "swinv2_giant", "swinv2_nano"} <= set(MODEL_CONFIGS)
    model = create_model("swinv2_tiny", img_size=192, window_size=12, num_classes=0)
    assert model.num_features == 768 and model.num_lr_layers == 14
    wins = [blk.window_size[0] for layer in model.layers for blk in layer.blocks]
    assert wins == [12] * 10 + [6] * 2  # stage 3 (6x6 tokens) clipped to 6, as officially
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(27.6e6, rel=0.02)
    depths = (2, 2, 6, 2)
    assert swin_layer_id("encoder.mask_token", depths) == 0
    assert swin_layer_id("layers.1.blocks.1.attn.qkv.weight", depths) == 4
    assert swin_layer_id("layers.1.downsample.reduction.weight", depths) == 4
    assert swin_layer_id("norm.weight", depths) == 13
    assert {"cpb_mlp", "logit_scale"} <= model.no_weight_decay_keywords()
    with pytest.raises(ValueError, match="unknown model 'swinv2_tinyy'"):
        create_model("swinv2_tinyy")
    with pytest.raises(TypeError, match="unknown arguments: \\['windw_size'\\]"):
        create_model("swinv2_nano", windw_size=4)
    with pytest.raises(ValueError, match="pretrained_window_sizes"):
        create_model("swinv2_nano", pretrained_window_sizes=(4, 4))
    with pytest.raises(ValueError, match="too small for 4 stages"):
        create_model("swinv2_nano", img_size=16)


@pytest.mark.parametrize("groups", [3, 1])
def test_cpu_attention_function_matches_sdpa_formulation(groups):
    """The hand-written CPU attention (forward and backward) equals the autograd + SDPA path used elsewhere, for a
    bias per window of an image (groups=3) and one bias shared by all windows (groups=1, unshifted blocks)."""
    g = torch.Generator().manual_seed(0)
    bw, n, nh, hd = 6, 9, 2, 4  # 2 images of 3 windows
    qkv = torch.randn(bw, n, 3 * nh * hd, generator=g, dtype=torch.float64)
    scale = torch.rand(nh, 1, 1, generator=g, dtype=torch.float64) * 20
    bias = torch.randn(groups * nh, n, n, generator=g, dtype=torch.float64)
    bias[:, :, -2:] = -100.0  # some masked keys
    w = torch.randn(bw, n, nh * hd, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: cosine_window_attention(*a)[0], lambda *a: _sdpa_attention(*a, 0.0)):
        inputs = [t.clone().requires_grad_(True) for t in (qkv, scale, bias)]
        out = fn(*inputs)
        results.append([out, *torch.autograd.grad((out * w).sum(), inputs)])
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-12
    if groups == 1:  # the shared bias gives what the same bias tiled per window gives
        tiled = bias.repeat(3, 1, 1).requires_grad_(True)
        out = cosine_window_attention(qkv, scale, tiled)[0]
        assert rel_err(out, results[0][0]) <= 1e-12
        grad = torch.autograd.grad((out * w).sum(), tiled)[0]
        assert rel_err(grad.view(3, nh, n, n).sum(0), results[0][3]) <= 1e-12


@pytest.mark.parametrize("n,hd", [(9, 24), (16, 32), (36, 24), (36, 32)])
def test_cpu_attention_bfloat16_matches_float64(monkeypatch, n, hd):
    """bfloat16 q, k, v with a float32 bias (autocast) through the op, in small chunks, agree with float64 within
    bfloat16 rounding, on every path: rows under 32 keys (softmax backward via float32) or not, heads under 32
    channels (per-row factors written out) or not."""
    monkeypatch.setattr(swinv2, "_SOFTMAX_CHUNK_BYTES", 8 * n * n)  # several chunks in forward and backward
    g = torch.Generator().manual_seed(0)
    bw, nh = 6, 2
    qkv = torch.randn(bw, n, 3 * nh * hd, generator=g).bfloat16()
    scale = torch.rand(nh, 1, 1, generator=g) * 20 + 1
    bias = torch.randn(3 * nh, n, n, generator=g) * 4
    w = torch.randn(bw, n, nh * hd, generator=g)
    results = []
    for fn, dtype in ((lambda *a: cosine_window_attention(*a)[0], None), (_sdpa_attention, torch.float64)):
        inputs = [(t if dtype is None else t.to(dtype)).clone().requires_grad_(True) for t in (qkv, scale, bias)]
        out = fn(*inputs) if dtype is None else fn(*inputs, 0.0)
        results.append([out, *torch.autograd.grad((out * w.to(out.dtype)).sum(), inputs)])
    for name, a, b in zip(("out", "qkv", "scale", "bias"), *results):
        assert rel_err(a.double(), b) <= 3e-2, name  # observed up to 1.8e-2
