"""simmim.io: load_pretrained from every supported layout gives the source model's outputs; bad files give clear
errors; the one atomic writer and its stale-temporary clean-up; the resume pre-flight check; encoder provenance."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types

import pytest
import torch

from simmim.io import (
    CheckpointError,
    load_pretrained,
    read_pretrained,
    remove_stale_temporaries,
    save_encoder,
    save_torch,
)
from simmim.models.simmim import build_simmim
from simmim.models.swinv2 import SwinTransformerV2

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (the zero-initialised post-norms would hide most mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def ours(num_classes: int = 5, **kw) -> SwinTransformerV2:
    return SwinTransformerV2(**{**dict(img_size=32, num_classes=num_classes, **TINY), **kw}).eval()


def official_buffers(model: SwinTransformerV2, prefix: str = "") -> dict[str, torch.Tensor]:
    """The buffers the official code saves (and we rebuild): tables, indices, shifted-window masks."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "relative_coords_table"):
            out[f"{prefix}{name}.relative_coords_table"] = mod.relative_coords_table
            out[f"{prefix}{name}.relative_position_index"] = mod.relative_position_index
        if hasattr(mod, "shift_size") and any(mod.shift_size):
            h, w = mod.input_resolution
            out[f"{prefix}{name}.attn_mask"] = mod.attn_mask(h, w, torch.device("cpu"))
    return out


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in for yacs.config.CfgNode (a dict subclass with attributes), as pickled in official files."""
    mod = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    mod.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    return CfgNode


def test_official_simmim_checkpoint(tmp_path, fake_yacs):
    simmim = randomise(build_simmim("swinv2_nano", img_size=32, embed_dim=16, num_heads=(1, 2, 2, 4)))
    sd = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in simmim.state_dict().items()}  # released naming
    sd.update(official_buffers(simmim.encoder, "encoder."))
    cfg = fake_yacs({"MODEL": fake_yacs({"TYPE": "swinv2"})})
    path = save_torch({"model": sd, "config": cfg, "epoch": 799, "max_accuracy": 0.0}, tmp_path / "ckpt.pth")
    sys.modules.pop("yacs.config")  # the reader must not need yacs

    model = ours(num_classes=10)
    report = load_pretrained(model, path)
    assert report.source == "official"
    assert report.missing == ["head.weight", "head.bias"]
    assert "mask_token" in report.dropped and "decoder.0.weight" in report.dropped
    assert report.pretrained_window_sizes == (4, 4, 2, 1)
    x = images()
    zero = torch.zeros(2, 8, 8, dtype=torch.long)
    with torch.no_grad():
        expected = simmim.encoder(x, zero).permute(0, 2, 3, 1)
        torch.testing.assert_close(model.forward_features(x), expected)
    assert "newly initialised: 2: head.weight, head.bias" in str(report)


def test_official_classification_checkpoint(tmp_path):
    src = randomise(ours(num_classes=5))
    path = save_torch({"model": {**src.state_dict(), **official_buffers(src)}}, tmp_path / "cls.pth")
    same = ours(num_classes=5)
    report = load_pretrained(same, path)
    assert report.missing == [] and report.dropped == []
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x))
    other = ours(num_classes=3)
    report = load_pretrained(other, path)
    assert report.missing == ["head.weight", "head.bias"]
    assert set(report.dropped) == {"head.weight", "head.bias"}


def test_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.models.swin_transformer_v2.SwinTransformerV2(img_size=32, num_classes=5, **TINY)
    randomise(src)
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    model = ours(num_classes=5)
    report = load_pretrained(model, path)
    assert report.source == "timm" and report.missing == [] and report.dropped == []
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-4)


def _hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, **kw
    )


def test_hf_image_classification(tmp_path):
    transformers, cfg = _hf_config(num_labels=5)
    src = randomise(transformers.Swinv2ForImageClassification(cfg))
    path = tmp_path / "hf.pth"
    torch.save(src.state_dict(), path)
    model = ours(num_classes=5)
    report = load_pretrained(model, path)
    assert report.source == "hf" and report.missing == []
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(pixel_values=x).logits, atol=1e-5, rtol=1e-4)


def test_hf_masked_image_modeling(tmp_path):
    transformers, cfg = _hf_config(encoder_stride=32)
    src = randomise(transformers.Swinv2ForMaskedImageModeling(cfg))
    path = tmp_path / "hf_mim.pth"
    torch.save(src.state_dict(), path)
    model = ours(num_classes=5)
    report = load_pretrained(model, path)
    assert report.missing == ["head.weight", "head.bias"]
    assert "mask_token" in report.dropped and any(k.startswith("decoder.") for k in report.dropped)
    x = images()
    with torch.no_grad():
        hf = src.swinv2(pixel_values=x).last_hidden_state  # [B, h*w, C]
        torch.testing.assert_close(model.forward_features(x).flatten(1, 2), hf, atol=1e-5, rtol=1e-4)


def test_encoder_safetensors_and_lightning_layout(tmp_path):
    simmim = randomise(build_simmim("swinv2_nano", img_size=32))
    config = {"model": "swinv2_nano", "img_size": 32}
    enc = save_encoder(simmim.encoder.state_dict(), tmp_path / "encoder.safetensors", config)
    # A Lightning checkpoint keeps the SimMIM model under an attribute: model.encoder.* / model.decoder.*
    ckpt = save_torch(
        {
            "state_dict": {f"model.{k}": v for k, v in simmim.state_dict().items()},
            "hyper_parameters": {"model_config": config},
            "epoch": 1,
        },
        tmp_path / "last.ckpt",
    )
    x = images()
    zero = torch.zeros(2, 8, 8, dtype=torch.long)
    with torch.no_grad():
        expected = simmim.encoder(x, zero).permute(0, 2, 3, 1)
    for path, source in ((enc, "encoder-safetensors"), (ckpt, "lightning")):
        model = SwinTransformerV2(
            img_size=32, num_classes=4, window_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)
        ).eval()
        report = load_pretrained(model, path)
        assert report.source == source
        assert report.missing == ["head.weight", "head.bias"]
        assert report.pretrained_window_sizes == (4, 4, 2, 1)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), expected)


def official_table(window: int, pretrained: int) -> torch.Tensor:
    """The official relative_coords_table formula, written out independently."""
    r = torch.arange(-(window - 1), window, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(r, r, indexing="ij")).permute(1, 2, 0).unsqueeze(0) / (pretrained - 1) * 8
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def test_transfer_192_w12_to_224_w14(tmp_path):
    kw = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    pre = randomise(build_simmim("swinv2_nano", img_size=192, window_size=12, **kw))
    sd = {**pre.state_dict(), **official_buffers(pre.encoder, "encoder.")}
    path = save_torch({"model": sd}, tmp_path / "pt.pth")
    weights = read_pretrained(path)
    assert weights.window_sizes == (12, 12, 12, 6)
    model = SwinTransformerV2(
        img_size=224, window_size=14, num_classes=7, pretrained_window_sizes=(12, 12, 12, 6), **kw
    )
    report = load_pretrained(model, weights)
    assert report.missing == ["head.weight", "head.bias"]
    attn = model.layers[0].blocks[0].attn
    assert attn.window_size == (14, 14)
    torch.testing.assert_close(attn.relative_coords_table, official_table(14, 12))
    last = model.layers[3].blocks[0].attn
    torch.testing.assert_close(last.relative_coords_table, official_table(7, 6))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


# ---- bad files ---------------------------------------------------------------------------------------


def test_bad_files(tmp_path):
    model = ours()
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    jpeg = tmp_path / "photo.pth"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cases = {
        text: "looks like a text file",
        jpeg: "looks like a JPEG image",
        empty: "is empty",
        tmp_path: "is not a file",
        tmp_path / "missing.ckpt": "does not exist",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError, match=expected):
            load_pretrained(model, path)


def test_truncated_checkpoint(tmp_path):
    src = save_torch({"state_dict": {f"model.{k}": v for k, v in ours().state_dict().items()}}, tmp_path / "a")
    data = src.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(ours(), cut)


def test_no_swin_weights(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match="no SwinV2 weights"):
        load_pretrained(ours(), path)


def test_mismatched_model_size(tmp_path):
    path = tmp_path / "nano.pth"
    torch.save({"model": ours().state_dict()}, path)
    bigger = ours(embed_dim=24)
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight has shape \[16, 3, 4, 4\].*embed_dim is 16"):
        load_pretrained(bigger, path)
    deeper = ours(depths=(1, 1, 4, 1))
    with pytest.raises(CheckpointError, match="different depths"):
        load_pretrained(deeper, path)
    report = load_pretrained(deeper, path, strict_shapes=False)
    assert "layers.2.blocks.3.attn.qkv.weight" in report.missing
    # an exported encoder knows its model: the message names it
    save_encoder(ours().state_dict(), tmp_path / "nano.safetensors", {"model": "swinv2_nano"})
    with pytest.raises(CheckpointError, match=r"embed_dim is 16 .*\(model.name=swinv2_nano\)"):
        load_pretrained(bigger, tmp_path / "nano.safetensors")


def test_untrusted_objects_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "evil.pth"
    torch.save({"model": ours().state_dict(), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_pretrained(ours(), path)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".last.ckpt.tmp{dead.stdout.strip()}", f".a.ckpt.tmp{alive.pid}", f".b.ckpt.tmp{os.getpid()}"]
        for name in [*names, "last.ckpt", ".notes.tmpX"]:
            (tmp_path / name).write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path) == [tmp_path / names[0]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], "last.ckpt", ".notes.tmpX"])
    finally:
        alive.kill()
        alive.wait()


def test_a_pickled_module_is_explained(tmp_path):
    torch.save(torch.nn.Linear(2, 3), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module.pt holds nothing the safe loader can read .*state_dict\(\)"):
        read_pretrained(tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"holds a Linear, not a state dict"):
        read_pretrained(tmp_path / "module.pt", trust_checkpoint=True)
