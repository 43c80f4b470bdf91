"""State-dict converters: exact round trips, loading into timm and HF transformers, equal outputs, layout detection."""

import math

import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from transformers import Swinv2Config, Swinv2Model

from simmim.models.convert import (
    clean_official,
    detect_layout,
    hf_config_to_official,
    hf_to_official,
    official_config_to_hf,
    official_to_hf,
    official_to_timm,
    timm_to_official,
)
from simmim.models.swinv2 import SwinTransformerV2

KW = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=4)


def _ours(pws=(0, 0, 0, 0), seed: int = 0) -> SwinTransformerV2:
    """float64 model with every parameter random; logit scales in [log 2, log 10] (see the HF test)."""
    torch.manual_seed(seed)
    model = SwinTransformerV2(**KW, num_classes=7, drop_path_rate=0.0, pretrained_window_sizes=pws).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.uniform_(math.log(2), math.log(10))
            elif "norm" in name or "bias" in name:
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0)
    return model


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timm_round_trip_is_exact_and_loads_strictly():
    sd = _ours().state_dict()
    timm_sd = official_to_timm(sd)
    assert _same(timm_to_official(timm_sd), sd)
    model = TimmSwinV2(**KW, num_classes=7).double()
    model.load_state_dict(timm_sd)  # strict: every timm key present, nothing extra
    assert _same(timm_to_official(model.state_dict()), sd)  # from timm's own dict (with its buffers) back
    assert "layers.1.downsample.reduction.weight" in timm_sd and "head.fc.weight" in timm_sd


@pytest.mark.parametrize("pws", [(0, 0, 0, 0), (6, 6, 4, 2)])
def test_hf_round_trip_and_equivalence(pws):
    """HF's Swinv2Model with converted weights gives our features. HF adds the shift mask twice (-200 instead of
    the official -100); both vanish next to exp(logit range) as long as the temperatures stay moderate, which is
    why the logit scales here are at most log(10): at the 100 clamp the difference reaches exp(-100 + 216)."""
    ours = _ours(pws)
    sd = ours.state_dict()
    hf_sd = official_to_hf(sd, prefix="")
    assert _same(hf_to_official(hf_sd), sd)
    cfg = Swinv2Config(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=list(KW["depths"]),
        num_heads=list(KW["num_heads"]),
        window_size=4,
        drop_path_rate=0.0,
        pretrained_window_sizes=list(pws),
    )
    hf = Swinv2Model(cfg).double().eval()
    missing, unexpected = hf.load_state_dict(
        {k: v for k, v in hf_sd.items() if not k.startswith("classifier.")}, strict=False
    )
    assert unexpected == [] and all(k.endswith(("relative_coords_table", "relative_position_index")) for k in missing)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        out = ours.eval().forward_features(x).flatten(1, 2)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-10
    # and back: HF's own state dict (with its buffers) converts to ours exactly
    back = hf_to_official(hf.state_dict())
    assert _same(back, {k: v for k, v in sd.items() if not k.startswith("head.")})


def test_hf_task_model_prefix_and_mim_decoder():
    sd = _ours().state_dict()
    task = official_to_hf(sd)  # default prefix "swinv2." as in Swinv2ForImageClassification
    assert "swinv2.embeddings.patch_embeddings.projection.weight" in task and "classifier.weight" in task
    task["decoder.0.weight"] = torch.zeros(3072, 128, 1, 1)  # Swinv2ForMaskedImageModeling's conv
    back = hf_to_official(task)
    assert torch.equal(back.pop("decoder.0.weight"), task["decoder.0.weight"])
    assert _same(back, sd)


def test_official_release_checkpoint_is_cleaned():
    """Released SimMIM-SwinV2 checkpoints call the bias MLP rpe_mlp and carry rebuilt buffers."""
    sd = _ours().state_dict()
    release = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in sd.items()}
    release["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    release["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    release["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    assert _same(clean_official(release), sd)
    model = _ours(seed=1)
    model.load_state_dict(clean_official(release))
    assert _same(model.state_dict(), sd)


def test_detect_layout():
    sd = _ours().state_dict()
    assert detect_layout(sd) == "official"
    assert detect_layout({"encoder." + k: v for k, v in sd.items()}) == "official"
    assert detect_layout(official_to_timm(sd)) == "timm"
    no_head = {k: v for k, v in official_to_timm(sd).items() if not k.startswith("head")}
    assert detect_layout(no_head) == "timm"  # from the downsample placement alone
    assert detect_layout(official_to_hf(sd)) == "hf"
    assert detect_layout(official_to_hf(sd, prefix="")) == "hf"


def test_hf_simmim_keys_are_swinv2_for_masked_image_modeling_keys():
    """Encoder, mask token and pixel decoder -> exactly the keys of HF's SimMIM model, and back."""
    from transformers import Swinv2ForMaskedImageModeling

    from simmim.models.simmim import build_simmim

    simmim = build_simmim("swinv2_nano", img_size=32)
    sd = {**simmim.encoder.state_dict(), **{f"decoder.{k}": v for k, v in simmim.decoder.state_dict().items()}}
    hf_sd = official_to_hf(sd)
    cfg = Swinv2Config(**official_config_to_hf({**simmim_config(), "img_size": 32}))
    assert cfg.encoder_stride == 32 == simmim.encoder_stride
    hf = Swinv2ForMaskedImageModeling(cfg)
    assert hf_sd.keys() == hf.state_dict().keys()
    hf.load_state_dict(hf_sd)  # strict, shapes included
    assert _same(hf_to_official(hf_sd), sd)


def simmim_config() -> dict:
    """swinv2_nano's complete constructor arguments, as an export records them."""
    from simmim.io import full_config

    return full_config({"model": "swinv2_nano"})


def test_hf_config_round_trip_and_the_one_token_window():
    """Our config -> Swinv2Config fields -> ours. A pretrained window of 1 (the 1x1 last stage of a small model)
    becomes 2 for HF: we and timm divide Log-CPB coordinates by max(p - 1, 1), HF by p - 1 (0/0 = NaN)."""
    from simmim.models.layers import relative_coords_table

    cfg = {**simmim_config(), "img_size": 32, "pretrained_window_sizes": [4, 4, 2, 1]}
    hf = official_config_to_hf(cfg)
    assert hf["pretrained_window_sizes"] == [4, 4, 2, 2] and hf["image_size"] == 32 and hf["num_channels"] == 3
    back = hf_config_to_official(hf)
    assert {k: v for k, v in back.items() if k != "pretrained_window_sizes"} == {
        k: cfg[k] for k in back if k != "pretrained_window_sizes"
    }
    model = Swinv2Model(Swinv2Config(**hf))
    last = model.encoder.layers[3].blocks[0].attention.self
    assert torch.isfinite(last.relative_coords_table).all()
    torch.testing.assert_close(last.relative_coords_table, relative_coords_table((1, 1), (1, 1)), rtol=0, atol=0)
    first = model.encoder.layers[0].blocks[0].attention.self
    torch.testing.assert_close(first.relative_coords_table, relative_coords_table((4, 4), (4, 4)), rtol=0, atol=0)
