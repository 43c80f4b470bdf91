"""The benchmark scripts run and print their tables (tiny geometry; the numbers themselves are not checked)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = ["--model", "swinv2_nano", "--img-size", "32", "--window", "4", "--batch", "2", "--rounds", "1"]


@pytest.mark.parametrize("extra", [[], ["--inference"]])
def test_encoder_benchmark(capsys, extra):
    from benchmarks import encoder

    encoder.main([*TINY, "--dtypes", "fp32,bf16", *extra])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| fp32 |", "| bf16 |"))]
    assert len(rows) == 2, out
    assert ("inference (forward only)" in out) == bool(extra)


def test_attention_share_benchmark(capsys):
    from benchmarks import attention_share

    attention_share.main(TINY)
    out = capsys.readouterr().out
    assert "| ours, matrix products only |" in out and "with an attention of matrix products only" in out, out


@pytest.mark.slow
def test_export_benchmark(capsys):
    from benchmarks import export

    export.main(["--model", "swinv2_nano", "--img-size", "32", "--window", "4", "--formats", "hf,official"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| hf |", "| official |"))]
    assert len(rows) == 2 and out.startswith("CPU: "), out
