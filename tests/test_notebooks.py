"""The notebooks run top to bottom (with the quick setting) and draw their pictures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name, min_pictures", [("posterior_inspection.ipynb", 7), ("variants.ipynb", 4)])
def test_notebook_runs_top_to_bottom(name, min_pictures, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PYRO_VAE_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.delenv("PYRO_VAE_NOTEBOOK_RUN", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # raises CellExecutionError, naming the cell, on the first cell that fails
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) >= min_pictures
    assert not [out for out in outputs if out.output_type == "error"]
    assert not [out for out in outputs if out.get("name") == "stderr" and "Warning" in out.get("text", "")]
