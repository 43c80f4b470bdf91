"""The benchmark scripts run and print their tables (tiny geometry; the numbers themselves are not checked), with the
CPU class in the header and bf16 rows only where this CPU has native bf16 (or when asked)."""

import re
import sys
from pathlib import Path

import pytest

from simmim import runtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = ["--model", "swinv2_nano", "--img-size", "32", "--window", "4", "--batch", "2", "--rounds", "1"]


@pytest.mark.parametrize("extra", [[], ["--inference"]])
def test_encoder_benchmark(capsys, extra):
    from benchmarks import encoder

    encoder.main([*TINY, *extra])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| fp32 |", "| bf16 |"))]
    native = runtime.machine().native_bf16
    assert len(rows) == (2 if native else 1), out
    assert all(re.search(r"\| \d+\.\d\d-\d+\.\d\dx \|", row) for row in rows), out  # the rounds' ratio range
    assert runtime.describe() in out and ("bf16 rows skipped" in out) != native
    assert ("inference (forward only)" in out) == bool(extra)


def test_encoder_benchmark_times_bf16_when_asked(capsys):
    """Asked for, bf16 rows run on any CPU (without native bf16 the matmul peak is ATen's, oneDNN has no kernel)."""
    from benchmarks import encoder

    encoder.main([*TINY, "--dtypes", "bf16", "--batch", "1", "--img-size", "32"])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("| bf16 |")] and "skipped" not in out, out


def test_bf16_rows_follow_the_cpu(monkeypatch):
    from benchmarks._common import bf16_rows

    without = runtime.Machine("cpu", "x86_64", "AVX2", False, 2, 0, False)
    monkeypatch.setattr(runtime, "machine", lambda: without)
    assert bf16_rows(["fp32", "bf16"], explicit=False)[0] == ["fp32"]
    assert bf16_rows(["fp32", "bf16"], explicit=True) == (["fp32", "bf16"], None)


def test_attention_share_benchmark(capsys):
    from benchmarks import attention_share

    attention_share.main(TINY)
    out = capsys.readouterr().out
    assert "| ours, matrix products only |" in out and "with an attention of matrix products only" in out, out
    assert runtime.describe() in out


@pytest.mark.slow
def test_export_benchmark(capsys):
    from benchmarks import export

    export.main(["--model", "swinv2_nano", "--img-size", "32", "--window", "4", "--formats", "hf,official"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| hf |", "| official |"))]
    assert len(rows) == 2 and out.startswith("CPU: "), out
