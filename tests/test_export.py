"""python -m simmim.export on real runs: each format loaded by its own library (transformers, timm, onnxruntime, the
official loaders' rules), outputs equal to ours (float64 <= 1e-10, ONNX fp32 relative <= 1e-4), model cards, and
the way back in through pretrained= and model.init_from=."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pretrain_args, write_images

from simmim.io import model_from_weights as ours_from
from simmim.io import read_pretrained, simmim_from_weights
from simmim.models.convert import official_to_timm

IMG = 32


@pytest.fixture(scope="module")
def pretrain_run(image_folder, tmp_path_factory) -> Path:
    """A real 4-step fp32 pretraining of swinv2_nano at 32 px."""
    from simmim.cli.pretrain import run
    from simmim.cli.recipes import load_recipe

    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run(load_recipe("pretrain", pretrain_args(image_folder, run_dir, "data.batch_size=8", "schedule.steps=4")))
    return run_dir


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """An ImageFolder tree of three classes (train/ and val/)."""
    root = tmp_path_factory.mktemp("classes")
    for i, name in enumerate(("cat", "dog", "fox")):
        write_images(root / "train" / name, 8, seed=10 * i)
        write_images(root / "val" / name, 3, seed=10 * i + 1)
    return root


def finetune_args(pretrained: Path | str, root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "recipe=quickstart", f"pretrained={pretrained}", f"data.root={root}", "data.source=imagefolder",
        "data.batch_size=8", "data.num_workers=0", "data.label_fraction=1.0", "schedule.epochs=1",
        "trainer.precision=32-true", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetune_run(pretrain_run, classes, tmp_path_factory) -> Path:
    """A real one-epoch fp32 fine-tuning of the pretraining run (3 classes)."""
    from simmim.cli.finetune import run
    from simmim.cli.recipes import load_recipe

    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    run(load_recipe("finetune", finetune_args(pretrain_run, classes, run_dir)))
    return run_dir


def cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pretrain_run, finetune_run):
    """``exported(source, fmt)``: the folder of ``python -m simmim.export`` (run once per pair). Sources: the
    pretraining run folder, its encoder.safetensors, the fine-tuning run folder."""
    sources = {"pretrain": pretrain_run, "encoder": pretrain_run / "encoder.safetensors", "finetune": finetune_run}
    done: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(source: str, fmt: str) -> Path:
        if (source, fmt) not in done:
            out = root / f"{source}_{fmt}"
            res = cli("simmim.export", sources[source], "--to", fmt, "--out", out)
            assert res.returncode == 0, res.stderr[-3000:]
            assert res.stdout.startswith(f"wrote {out} ({fmt}: ") and (out / "README.md").is_file()
            done[source, fmt] = out
        return done[source, fmt]

    return get


def images(n: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- hf ------------------------------------------------------------------------------------------------------


def test_hf_simmim_export_is_swinv2_for_masked_image_modeling(exported, pretrain_run, image_folder):
    from transformers import AutoImageProcessor, Swinv2ForMaskedImageModeling

    out = exported("pretrain", "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    hf, info = Swinv2ForMaskedImageModeling.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every key loaded, none left over: encoder, mask token, decoder
    ours = simmim_from_weights(read_pretrained(pretrain_run)).double()
    x = images()
    mask = torch.zeros(3, 8, 8, dtype=torch.long)
    mask[:, 2:6, 1:5] = 1
    with torch.no_grad():
        theirs = hf.double().eval()(pixel_values=x, bool_masked_pos=mask.flatten(1).bool())
        assert rel(theirs.reconstruction, ours.reconstruct(x, mask)) <= 1e-10
        # our loss is reduced in float32 (models/simmim.masked_l1): agreement at that precision
        assert float(theirs.loss) == pytest.approx(float(ours(x, mask)), rel=1e-6)
    processor = AutoImageProcessor.from_pretrained(out)
    assert (processor.size["height"], processor.size["width"]) == (IMG, IMG)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    card = (out / "README.md").read_text()
    loss = read_pretrained(pretrain_run / "encoder.safetensors").meta["provenance"]["final_loss"]
    for text in ("# swinv2_nano (simmim), hf export", "| steps | 4 |", f"| result | final training loss {loss:.4f}",
                 "| recipe | `quickstart`", f"| data | `{image_folder}` (source folder", "batch_size: 8",
                 "Swinv2ForMaskedImageModeling.from_pretrained(", "encoder, mask token and pixel decoder"):  # fmt: skip
        assert text in card, text


def test_hf_encoder_export_is_swinv2_model(exported, pretrain_run):
    from transformers import Swinv2Model

    hf, info = Swinv2Model.from_pretrained(exported("encoder", "hf"), output_loading_info=True)
    assert not any(info.values()), info
    ours = ours_from(read_pretrained(pretrain_run / "encoder.safetensors")).double()
    x = images()
    with torch.no_grad():
        theirs = hf.double().eval()(pixel_values=x)
        features = ours.forward_features(x)
        assert rel(theirs.last_hidden_state, features.flatten(1, 2)) <= 1e-10
        assert rel(theirs.pooler_output, features.mean(dim=(1, 2))) <= 1e-10


def test_hf_classifier_export_gives_our_logits_and_class_names(exported, finetune_run):
    from transformers import Swinv2ForImageClassification

    out = exported("finetune", "hf")
    hf, info = Swinv2ForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "fox"} and hf.config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    ours = ours_from(read_pretrained(finetune_run))
    x = images(4, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).logits, ours(x), rtol=1e-5, atol=1e-5)
        logits64 = hf.double()(pixel_values=x.double()).logits
        assert rel(logits64, ours.double()(x.double())) <= 1e-10
        assert torch.equal(logits64.argmax(1), ours(x.double()).argmax(1))
    metrics = json.loads((finetune_run / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| result | top-1 {metrics['test']['top1']:.2f}% (val split) |" in card
    assert "fine-tuned classifier: encoder and linear head, 3 classes" in card and "0: cat, 1: dog, 2: fox" in card


# ---- timm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["pretrain", "finetune"])
def test_timm_export_loads_strictly_both_ways(exported, pretrain_run, finetune_run, source, caplog):
    import timm

    out = exported(source, "timm")
    cfg = json.loads((out / "config.json").read_text())
    ours = ours_from(read_pretrained(pretrain_run if source == "pretrain" else finetune_run))
    expected = official_to_timm(ours.state_dict())
    overlay = dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="timm"):
        models = [
            timm.create_model(f"local-dir:{out}", pretrained=True),
            timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"]),  # noqa: E501
        ]
    assert not [r.message for r in caplog.records if "Missing keys" in r.message or "Unexpected keys" in r.message]
    x = images()
    for model in models:
        theirs = {k: v for k, v in model.state_dict().items() if k in expected}
        assert theirs.keys() == {k for k in model.state_dict() if not k.endswith(("_index", "coords_table", "mask"))}
        assert all(torch.equal(theirs[k], expected[k]) for k in theirs)  # every weight is the export's
        model, ref = model.double().eval(), ours.double()
        with torch.no_grad():
            if source == "pretrain":
                assert rel(model.forward_features(x), ref.forward_features(x)) <= 1e-10
            else:
                assert rel(model(x), ref(x)) <= 1e-10
    if source == "finetune":
        assert models[0].pretrained_cfg["label_names"] == ["cat", "dog", "fox"]
        assert models[0].pretrained_cfg["crop_pct"] == pytest.approx(0.875)


# ---- official ------------------------------------------------------------------------------------------------


def test_official_exports_follow_the_official_layouts(exported, pretrain_run, finetune_run):
    from simmim.models.simmim import build_simmim

    ckpt = torch.load(exported("pretrain", "official") / "model.pth", map_location="cpu")  # plain weights_only load
    state = ckpt["model"]
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"} and "encoder.mask_token" in state
    assert sum(k.endswith("relative_coords_table") for k in state) == 5  # one per block (no shifted block here)
    # the official SimMIM resume: model.load_state_dict(checkpoint["model"]); ours rebuilds the buffers
    buffers = ("relative_position_index", "relative_coords_table", "attn_mask")
    model = build_simmim("swinv2_nano", img_size=IMG)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(buffers)})  # strict
    ref = simmim_from_weights(read_pretrained(pretrain_run))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    for k, v in model.encoder.state_dict(keep_vars=False).items():
        if k.endswith(buffers[:2]):
            assert torch.equal(state[f"encoder.{k}"], v), k
    # the official fine-tuning load: encoder.* keys with the prefix removed; here the classification layout
    cls = torch.load(exported("finetune", "official") / "model.pth", map_location="cpu")
    assert "head.weight" in cls["model"] and not any(k.startswith("encoder.") for k in cls["model"])
    assert cls["max_accuracy"] == json.loads((finetune_run / "metrics.json").read_text())["test"]["top1"]
    ours = ours_from(read_pretrained(finetune_run))
    ours.load_state_dict({k: v for k, v in cls["model"].items() if not k.endswith(buffers)})  # strict


def official_mask(res: int, window: int, shift: int) -> torch.Tensor:
    """The official shifted-window mask (swin_transformer_v2.py's region slices), written out independently."""
    img = torch.zeros(res, res)
    cnt = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[h, w] = cnt
            cnt += 1
    win = img.view(res // window, window, res // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def test_official_buffers_are_the_official_models(tmp_path):
    from simmim.export.formats import official_buffers
    from simmim.models import SwinTransformerV2

    model = SwinTransformerV2(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
    buffers = official_buffers(model)
    masks = {k: v for k, v in buffers.items() if k.endswith("attn_mask")}
    assert sorted(masks) == ["layers.0.blocks.1.attn_mask", "layers.1.blocks.1.attn_mask"]  # 16x16, 8x8 > window
    torch.testing.assert_close(masks["layers.0.blocks.1.attn_mask"], official_mask(16, 4, 2), rtol=0, atol=0)
    torch.testing.assert_close(masks["layers.1.blocks.1.attn_mask"], official_mask(8, 4, 2), rtol=0, atol=0)
    index = buffers["layers.0.blocks.0.attn.relative_position_index"]
    assert index.shape == (16, 16) and index.dtype == torch.long and int(index.max()) == 7 * 7 - 1


# ---- onnx ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pretrain", "finetune"])
def test_onnx_export_runs_in_onnxruntime_with_any_batch(exported, pretrain_run, finetune_run, source):
    import onnxruntime as ort

    out = exported(source, "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = ours_from(read_pretrained(pretrain_run if source == "pretrain" else finetune_run))
    names = [o.name for o in session.get_outputs()]
    assert names == (["features", "pooled"] if source == "pretrain" else ["logits"])
    for batch in (1, 5):
        x = images(batch, torch.float32)
        outputs = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            features = ours.forward_features(x)
            refs = [features, features.mean(dim=(1, 2))] if source == "pretrain" else [ours(x)]
        for got, ref in zip(outputs, refs):
            assert got.shape == tuple(ref.shape) and rel(torch.from_numpy(got), ref) <= 1e-4
    card = (out / "README.md").read_text()
    assert "checked at export with onnxruntime" in card and "ort.InferenceSession(" in card


# ---- the way back in ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_export_reads_back_as_the_weights_it_came_from(exported, pretrain_run, finetune_run):
    from simmim.io import CheckpointError

    enc = read_pretrained(pretrain_run / "encoder.safetensors").state_dict
    full = read_pretrained(pretrain_run)
    cls = read_pretrained(finetune_run).state_dict
    cases = [("pretrain", "hf", "simmim"), ("encoder", "hf", "encoder"), ("pretrain", "timm", "encoder"),
             ("pretrain", "official", "simmim"), ("finetune", "hf", "classifier"),
             ("finetune", "timm", "classifier"), ("finetune", "official", "classifier")]  # fmt: skip
    for source, fmt, kind in cases:
        back = read_pretrained(exported(source, fmt))
        assert back.kind == kind, (source, fmt)
        want = cls if source == "finetune" else full.state_dict if kind == "simmim" else enc
        assert back.state_dict.keys() == want.keys(), (source, fmt)
        assert all(torch.equal(back.state_dict[k], want[k]) for k in want), (source, fmt)
        if kind == "simmim":
            assert all(torch.equal(back.decoder[k], v) for k, v in full.decoder.items())
        assert back.window_sizes == (4, 4, 2, 1), (source, fmt)
    assert read_pretrained(exported("finetune", "hf")).meta["class_names"] == ["cat", "dog", "fox"]
    with pytest.raises(CheckpointError, match="is an ONNX export: an inference graph, not trainable weights"):
        read_pretrained(exported("finetune", "onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("source, fmt", [("encoder", "hf"), ("pretrain", "timm"), ("pretrain", "official")])
def test_fine_tuning_starts_from_an_export(exported, classes, tmp_path, source, fmt):
    out = exported(source, fmt)
    res = cli("simmim.finetune", *finetune_args(out, classes, tmp_path / "ft", "schedule.steps=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = (tmp_path / "ft" / "load_report.txt").read_text()
    layout = {"hf": "hf", "timm": "timm", "official": "official"}[fmt]
    assert report.startswith(f"loaded 100 tensors from {out}") and f"({layout} layout)" in report, report
    assert "weights trained with windows [4, 4, 2, 1]" in report
    assert "newly initialised: 2: head.weight, head.bias" in report


@pytest.mark.slow
@pytest.mark.parametrize("fmt, taken", [("hf", True), ("official", True), ("timm", False)])
def test_pretraining_continues_from_an_export_decoder_and_all(exported, image_folder, tmp_path, fmt, taken):
    out = exported("pretrain", fmt)
    extra = ("data.batch_size=8", "schedule.steps=1", f"model.init_from={out}")
    args = pretrain_args(image_folder, tmp_path / "run", *extra)
    res = cli("simmim.pretrain", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    said = "taken from the checkpoint" if taken else "newly initialised"
    assert f"SimMIM: pixel decoder {said}, mask token {said}" in res.stdout + res.stderr, res.stderr[-3000:]


def test_init_from_an_export_starts_with_the_exported_decoder(exported, pretrain_run):
    from conftest import pretrain_module

    ref = simmim_from_weights(read_pretrained(pretrain_run))
    for fmt in ("hf", "official"):
        module = pretrain_module([f"model.init_from={exported('pretrain', fmt)}"])
        assert all(torch.equal(a, b) for a, b in zip(module.model.state_dict().values(), ref.state_dict().values()))


# ---- errors --------------------------------------------------------------------------------------------------


def test_export_errors_are_one_line(pretrain_run, tmp_path, capsys):
    from simmim.export.__main__ import main

    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    missing = tmp_path / "missing.ckpt"
    cases = [
        ([missing, "--to", "hf", "--out", tmp_path / "o1"], f"checkpoint {missing} does not exist"),
        ([notes, "--to", "timm", "--out", tmp_path / "o2"], "notes.txt is not a checkpoint (it looks like a text"),
        ([pretrain_run, "--to", "hf", "--out", notes], f"--out {notes} is a file: give a folder"),
        ([pretrain_run, "--to", "hf", "--out", tmp_path / "full"], "already holds files (x): give a new folder, or"),
    ]
    for args, text in cases:
        assert main(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    res = cli("simmim.export", notes, "--to", "official", "--out", tmp_path / "o3")  # and from the real CLI
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "looks like a text file" in res.stderr
    res = cli("simmim.export", pretrain_run, "--to", "tflite", "--out", tmp_path / "o3")
    assert res.returncode == 2 and "invalid choice: 'tflite'" in res.stderr and not (tmp_path / "o3").exists()
