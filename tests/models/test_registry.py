"""simmim.models.registry: named configurations, create_model, the saved encoder config, the effective windows."""

import pytest
import torch

from simmim.models import MODEL_CONFIGS, compile_model, create_model
from simmim.models.registry import config_stage_windows, encoder_config, stage_windows
from simmim.models.swinv2 import swin_layer_id


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


def test_encoder_config_rebuilds_the_model():
    cfg = encoder_config("swinv2_nano", img_size=32, window_size=None, use_checkpoint=True, attn_chunk_size=4)
    assert cfg == {
        "model": "swinv2_nano",
        "embed_dim": 32,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 4, 8],
        "window_size": 4,
        "img_size": 32,
    }
    name = cfg.pop("model")
    rebuilt = create_model(name, **cfg)
    assert rebuilt.state_dict().keys() == create_model("swinv2_nano", img_size=32).state_dict().keys()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        encoder_config("nope")


@pytest.mark.parametrize("img,window", [(192, 12), (224, 7), (64, 4), (32, 4), (52, 8)])
def test_stage_windows_are_the_blocks_windows(img, window):
    """The one effective-window rule: what the registry reports for a geometry is what the blocks use."""
    model = create_model("swinv2_tiny", img_size=img, window_size=window)
    blocks = [layer.blocks[0].window_size[0] for layer in model.layers]
    assert stage_windows(img, window) == tuple(blocks)
    assert config_stage_windows({"model": "swinv2_tiny", "img_size": img, "window_size": window}) == tuple(blocks)
    assert config_stage_windows({"model": "swinv2_tiny"}) is None  # no image size: unknown


def test_compile_model_refuses_unknown_modes():
    with pytest.raises(ValueError, match="not a torch.compile mode"):
        compile_model(torch.nn.Linear(2, 2), mode="fastest")
