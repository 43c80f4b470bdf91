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
from conftest import pretrain_args

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


# ---- the one atomic writer ----------------------------------------------------------------------------------

# Each writer of the run folder, killed between writing its temporary and the rename (SIGKILL from os.replace).
_KILLED_WRITES = {
    "torch": "from simmim.training.trainer import AtomicCheckpointIO\n"
    "AtomicCheckpointIO().save_checkpoint({'w': torch.zeros(3)}, folder / 'last.ckpt')",
    "safetensors": "from simmim.io import save_encoder\n"
    "save_encoder({'w': torch.zeros(3)}, folder / 'encoder.safetensors', {'model': 'swinv2_nano'})",
    "yaml": "from omegaconf import OmegaConf\nfrom simmim.cli.command import save_recipe\n"
    "save_recipe(OmegaConf.create({'seed': 0}), folder / 'recipe.yaml')",
    "json": "from simmim.io import save_json\nsave_json({'top1': 50.0}, folder / 'metrics.json')",
}


@pytest.mark.parametrize("kind", sorted(_KILLED_WRITES))
def test_a_writer_killed_before_its_rename_leaves_a_temporary_the_clean_up_removes(tmp_path, kind):
    code = (
        "import os, signal, sys\nfrom pathlib import Path\nimport simmim, torch\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"folder = Path(sys.argv[1])\n{_KILLED_WRITES[kind]}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (left,) = list(tmp_path.iterdir())  # the temporary only: the target was never half-written
    target = {"torch": "last.ckpt", "safetensors": "encoder.safetensors", "yaml": "recipe.yaml", "json": "metrics.json"}
    assert left.name.startswith(f".{target[kind]}.tmp") and left.stat().st_size > 0
    (tmp_path / "keep.txt").write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_writes_replace_the_file_whole_and_keep_the_umask(tmp_path):
    from simmim.io import load_encoder, save_json, save_text

    save_text("old\n", tmp_path / "a.txt")
    save_text("new\n", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "new\n"
    path = save_encoder({"w": torch.arange(3.0)}, tmp_path / "e.safetensors", {"model": "swinv2_nano"})
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # safetensors alone writes 0600
    assert torch.equal(load_encoder(path)[0]["w"], torch.arange(3.0))
    save_json({"p": tmp_path}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == '{\n  "p": "' + str(tmp_path) + '"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "e.safetensors", "m.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- SimMIM checkpoints: the decoder and mask token come along ------------------------------------------------


def test_a_simmim_model_takes_the_decoder_and_mask_token_of_an_official_checkpoint(tmp_path, fake_yacs):
    src = randomise(build_simmim("swinv2_nano", img_size=32))
    sd = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in src.state_dict().items()}  # released naming
    path = save_torch({"model": sd, "config": fake_yacs({"MODEL": fake_yacs({"TYPE": "swinv2"})})}, tmp_path / "o.pth")
    sys.modules.pop("yacs.config")
    target = build_simmim("swinv2_nano", img_size=32)
    report = load_pretrained(target, path)
    assert report.missing == [] and report.dropped == []
    assert "decoder.0.weight" in report.loaded and "mask_token" in report.loaded
    assert "SimMIM: pixel decoder taken from the checkpoint, mask token taken from the checkpoint" in str(report)
    x, mask = images(), torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, ::2] = 1
    with torch.no_grad():
        torch.testing.assert_close(target.eval().reconstruct(x, mask), src.reconstruct(x, mask), rtol=0, atol=0)
    # an encoder-only file: the head is new, and the report says so
    enc = save_encoder({k: v for k, v in src.encoder.state_dict().items() if k != "mask_token"}, tmp_path / "e.st", {})
    report = load_pretrained(build_simmim("swinv2_nano", img_size=32), enc)
    assert report.missing == ["mask_token", "decoder.0.weight", "decoder.0.bias"]
    assert "SimMIM: pixel decoder newly initialised, mask token newly initialised" in str(report)


def test_a_checkpoint_in_memory_reads_like_its_file(tmp_path):
    src = randomise(build_simmim("swinv2_nano", img_size=32))
    from simmim.io import simmim_from_weights

    hp = {"model_config": {"model": "swinv2_nano", "img_size": 32}, "norm_target": False}
    obj = {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "hyper_parameters": hp}

    for source in (obj, save_torch(obj, tmp_path / "last.ckpt")):
        weights = read_pretrained(source)
        assert weights.kind == "simmim" and weights.meta["trained_by"] == "pretrain"
        model = simmim_from_weights(weights)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))


# ---- a real run's checkpoints: provenance, the resume pre-flight check, visualize -----------------------------


@pytest.fixture(scope="module")
def short_run(image_folder, tmp_path_factory):
    """A real 4-step fp32 pretraining of swinv2_nano at 32 px: (run folder, run() output)."""
    from simmim.cli.pretrain import run
    from simmim.cli.recipes import load_recipe

    run_dir = tmp_path_factory.mktemp("short_run")
    out = run(load_recipe("pretrain", pretrain_args(image_folder, run_dir, "data.batch_size=8", "schedule.steps=4")))
    return run_dir, out


def test_encoder_safetensors_records_its_provenance(short_run):
    import simmim
    from simmim.io import encoder_provenance, load_encoder

    run_dir, out = short_run
    sd, config = load_encoder(run_dir / "encoder.safetensors")  # the config stays where it was
    assert config["model"] == "swinv2_nano" and config["img_size"] == 32 and "mask_token" not in sd
    meta = encoder_provenance(run_dir / "encoder.safetensors")
    assert meta["steps"] == out["steps"] == 4
    assert meta["final_loss"] == pytest.approx(out["loss"]) and 0 < meta["final_loss"] < 10
    assert meta["recipe"]["data"]["batch_size"] == 8 and meta["recipe"]["recipe"] == "quickstart"
    assert meta["simmim_version"] == simmim.__version__
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert read_pretrained(run_dir / "encoder.safetensors").meta["provenance"] == meta


def _resume_cli(image_folder, run_dir, *extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = pretrain_args(image_folder, run_dir, "data.batch_size=8", "schedule.steps=4", *extra)
    return subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expected",
    [
        ("text", "notes.ckpt is not a checkpoint (it looks like a text file). resume= takes a .ckpt a run wrote"),
        ("truncated", "cut.ckpt is truncated or corrupt (PytorchStreamReader"),
        ("other model", "holds a swinv2_nano (embed_dim 32, depths [1, 1, 2, 1], heads [1, 2, 4, 8]) but this run "
         "builds a swinv2_micro (embed_dim 48, depths [2, 2, 4, 2], heads [2, 4, 8, 16]) (different embed_dim, "
         "depths, num_heads): resume with the checkpoint's model (model.name=swinv2_nano)"),
    ],
)  # fmt: skip
def test_resume_refuses_a_bad_checkpoint_in_one_line_before_lightning_reads_it(
    short_run, image_folder, tmp_path, case, expected
):
    last = short_run[0] / "checkpoints" / "last.ckpt"
    extra: list[str] = []
    if case == "text":
        path = tmp_path / "notes.ckpt"
        path.write_text("step 100: loss 0.5\n")
    elif case == "truncated":
        path = tmp_path / "cut.ckpt"
        data = last.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path, extra = last, ["model.name=swinv2_micro"]
    res = _resume_cli(image_folder, tmp_path / "run", f"resume={path}", *extra)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: resume={path}: "), res.stderr[-3000:]
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_check_resume_names_what_the_file_is_and_what_to_do_instead(short_run):
    from simmim.io import check_resume

    run_dir, _ = short_run
    nano = {"name": "swinv2_nano", "img_size": 32, "window_size": 4, "norm_target": False}
    assert check_resume(run_dir / "checkpoints" / "last.ckpt", nano, "pretrain") is None
    assert check_resume(run_dir / "checkpoints" / "step=000002.ckpt", {**nano, "img_size": 64}, "pretrain") is None
    with pytest.raises(CheckpointError, match=r"encoder.safetensors holds encoder-safetensors weights but no training "
                       r"state: .* use model.init_from=.*encoder.safetensors"):  # fmt: skip
        check_resume(run_dir / "encoder.safetensors", nano, "pretrain")
    with pytest.raises(CheckpointError, match=r"is a pretrain checkpoint and this is a finetune run: resume it with "
                       r"python -m simmim.pretrain, or start from its weights with pretrained="):  # fmt: skip
        check_resume(run_dir / "checkpoints" / "last.ckpt", nano, "finetune")


def test_visualize_calls_a_truncated_checkpoint_truncated(short_run, image_folder, tmp_path, capsys):
    from simmim import visualize

    data = (short_run[0] / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    image = sorted(image_folder.iterdir())[0]
    assert visualize.main([str(tmp_path / "cut.ckpt"), str(image), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'cut.ckpt'} is truncated or corrupt") and err.count("\n") == 1, err
    # the encoder file is read by the same reader, and explained
    assert visualize.main([str(short_run[0] / "encoder.safetensors"), str(image), "--out", "g.png"]) == 2
    assert "has no SimMIM pixel decoder" in capsys.readouterr().err


def test_an_encoder_file_whose_header_length_starts_like_a_pickle_reads_as_safetensors(tmp_path):
    """A safetensors file begins with its header's length (little-endian, a multiple of 8): a length ending in 0x80
    looks like a pickle's first byte. The file must still read as safetensors, provenance and config included."""
    path, state = tmp_path / "encoder.safetensors", ours().state_dict()
    for pad in range(0, 256, 8):  # grow the metadata until the header length's low byte is 0x80
        save_encoder(state, path, {"model": "swinv2_nano"}, {"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    weights = read_pretrained(path)
    assert weights.meta["provenance"]["note"] == "x" * pad and weights.config["model"] == "swinv2_nano"
