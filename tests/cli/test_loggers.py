"""``logger=[...]``: MLflow against a real local file store (read back with the MLflow client) and W&B offline (its
run files read back), both through Lightning's own loggers, with metrics, the recipe and the pictures of the run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_args


@pytest.fixture(scope="module")
def logged_run(image_folder, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    args = pretrain_args(image_folder, run_dir, "data.batch_size=4", "trainer.max_steps=4", "schedule.epochs=1",
                         "reconstructions=2", "logger=[csv,mlflow,wandb]")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    res = subprocess.run([sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True,
                         timeout=300, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_mlflow_file_store_holds_metrics_recipe_and_reconstructions(logged_run):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(logged_run / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "quickstart"]
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1, 2, 3] and all(m.value > 0 for m in losses)
    assert run.data.params["recipe/data/batch_size"] == "4" and run.data.params["recipe/model/name"] == "swinv2_nano"
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-*.wandb``): after a 7-byte header, 32 KiB blocks of records, each
    a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its data."""
    data, pos, block, out, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


@pytest.mark.slow
def test_wandb_offline_run_files_hold_metrics_recipe_and_images(logged_run):
    from wandb.proto import wandb_internal_pb2

    (run_dir,) = (logged_run / "wandb").glob("offline-run-*")
    history, config = [], {}
    for data in wandb_records(next(run_dir.glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        elif record.WhichOneof("record_type") == "config":
            config.update({item.key: item.value_json for item in record.config.update})
    assert len([h for h in history if "train/loss" in h]) == 4
    recipe = json.loads(config["recipe"])
    assert recipe["data"]["batch_size"] == 4 and recipe["model"]["name"] == "swinv2_nano"
    assert list((run_dir / "files" / "media" / "images").glob("reconstructions_*.png"))
