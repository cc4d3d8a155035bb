"""The notebooks run top to bottom (with the quick setting) and draw their pictures."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pyro_vae import plot

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name, train, min_pictures", [
    ("posterior_inspection.ipynb", False, 7),  # the default: the shipped pretrained/latent2, no training
    ("posterior_inspection.ipynb", True, 7),  # asked to train: a new 2-D run first
    ("variants.ipynb", True, 4),  # trains each variant: that is what it compares
], ids=["posterior-shipped-run", "posterior-train", "variants"])
def test_notebook_runs_top_to_bottom(name, train, min_pictures, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PYRO_VAE_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.delenv("PYRO_VAE_NOTEBOOK_RUN", raising=False)
    if train:
        monkeypatch.setenv("PYRO_VAE_NOTEBOOK_TRAIN", "1")
    else:
        monkeypatch.delenv("PYRO_VAE_NOTEBOOK_TRAIN", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # raises CellExecutionError, naming the cell, on the first cell that fails
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    if name == "posterior_inspection.ipynb":  # which run it looked at: its epochs are printed
        printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
        assert ("trained for 1 epoch(s)" if train else "trained for 10 epoch(s)") in printed
        # Pyro's diagram of the model and guide where Graphviz's dot is installed, else one line saying it is not
        diagram = next(cell for cell in nb.cells if "plot.program_diagram(" in cell.source).outputs
        if shutil.which("dot"):
            assert [out.output_type for out in diagram] == ["execute_result"] and "image/png" in diagram[0].data
        else:
            assert [out.get("text") for out in diagram] == [plot.NO_DOT + "\n"]

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) >= min_pictures
    assert not [out for out in outputs if out.output_type == "error"]
    assert not [out for out in outputs if out.get("name") == "stderr" and "Warning" in out.get("text", "")]
