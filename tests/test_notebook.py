import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIGURES = ["reconstructions.png", "loss_heatmap.png", "mask_sweep.png", "temperatures.png", "position_bias.png"]


def _make_notebook():
    spec = importlib.util.spec_from_file_location("make_notebook", NOTEBOOKS / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_is_up_to_date_with_its_generator():
    assert _make_notebook().main(["--check"]) == 0, "run python notebooks/make_notebook.py"


def _ensure_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)


@pytest.mark.slow
def test_notebook_runs_headless_and_saves_its_figures(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _ensure_kernel()
    figures = tmp_path / "figures"
    monkeypatch.setenv("SIMMIM_NOTEBOOK_FIGURES", str(figures))
    monkeypatch.setenv("SIMMIM_NOTEBOOK_RUN_DIR", str(tmp_path / "run"))
    nb = nbformat.read(NOTEBOOKS / "explore_reconstructions.ipynb", as_version=4)
    # raises CellExecutionError (with the cell and its traceback) if any cell fails
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    for name in FIGURES:
        with Image.open(figures / name) as img:
            assert img.format == "PNG" and min(img.size) > 100, name
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(FIGURES)  # every figure is also displayed inline
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
