"""benchmarks/data.py runs and prints its tables (tiny sizes; the numbers themselves are not checked)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))


@pytest.mark.slow
def test_startup_and_listing_benchmarks_print_their_tables(capsys, tmp_path):
    from benchmarks import data

    data.main(["startup", "--samples", "1000", "--per-shard", "500", "--world", "1", "--rounds", "1",
               "--work", str(tmp_path / "work")])  # fmt: skip
    out = capsys.readouterr().out
    assert "| local folder |" in out and "| s3:// (moto server on loopback) |" in out, out
    data.main(["listing", "--files", "300", "--per-folder", "100", "--sources", "folder",
               "--tmpfs", str(tmp_path / "tree")])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("| now | folder | from the listing cache |") == 2 and "| 300 |" in out, out
    assert "imagefolder" not in out, out


def test_shard_order_of_the_library_comparison_reads_every_sample_once():
    from benchmarks import data

    order = data._window_order([5, 3, 4], 2)
    assert sorted(order.tolist()) == list(range(12))
