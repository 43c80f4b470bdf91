"""WindowAttention: official keys, the public terms of eq. 2 (temperature, position-bias table), the memoised
position bias following every way weights change."""

import math

import torch
from model_helpers import randomise

from simmim.models import create_model
from simmim.models.attention import LOG_MAX_SCALE, WindowAttention


def test_official_keys_and_the_terms_of_eq_2():
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, window_size=4, num_heads=2)
    assert set(attn.state_dict()) == {
        "logit_scale", "q_bias", "v_bias", "qkv.weight", "proj.weight", "proj.bias",
        "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight",
    }  # fmt: skip
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.0, 7.0]).view(2, 1, 1))
    assert torch.allclose(attn.temperature().flatten(), torch.tensor([math.e, 100.0]))  # clamped at log(100)
    assert LOG_MAX_SCALE == math.log(100.0)
    table = attn.position_bias_table()  # [nH, 2W-1, 2W-1]
    expect = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table)).permute(0, 3, 1, 2)[0]
    assert table.shape == (2, 7, 7) and torch.allclose(table, expect)
    bias = attn.position_bias()  # [nH, N, N]: offset (0, 0) on the diagonal, the table's centre
    assert bias.shape == (2, 16, 16) and torch.allclose(bias.diagonal(dim1=1, dim2=2), table[:, 3:4, 3].expand(2, 16))


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_memoised_position_bias_follows_weight_updates():
    torch.manual_seed(0)
    model = randomise(create_model("swinv2_nano", img_size=32)).eval()
    x = torch.randn(1, 3, 32, 32)
    y1 = _outputs(model, x)
    assert torch.equal(_outputs(model, x), y1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "cpb_mlp"):
                m.cpb_mlp[2].weight.mul_(3.0)
    y2 = _outputs(model, x)
    fresh = create_model("swinv2_nano", img_size=32).eval()
    fresh.load_state_dict(model.state_dict())
    assert not torch.allclose(y1, y2) and torch.equal(y2, _outputs(fresh, x))


def test_memoised_position_bias_follows_swapped_and_reloaded_tensors():
    """The memo is keyed on values, so replaced tensors (``.data`` swaps, ``load_state_dict(assign=True)``, dtype
    changes) and inference mode all see the current weights."""
    torch.manual_seed(0)
    a, b = (
        randomise(create_model("swinv2_nano", img_size=32), 0).eval(),
        randomise(create_model("swinv2_nano", img_size=32), 1).eval(),
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ya = a(x)
    yb = _outputs(b, x)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if "cpb_mlp" in name:
            p.data = q.detach().clone()
    a.load_state_dict({k: v for k, v in b.state_dict().items() if "cpb_mlp" not in k}, strict=False, assign=True)
    assert torch.equal(_outputs(a, x), yb) and not torch.equal(ya, yb)
    assert torch.allclose(_outputs(a.double(), x.double()), yb.double(), atol=1e-5)


def test_position_bias_carries_gradients_when_training():
    model = create_model("swinv2_nano", img_size=32)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(m.cpb_mlp[0].weight.grad is not None for m in model.modules() if isinstance(m, WindowAttention))
