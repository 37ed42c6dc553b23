"""notebooks/quickstart.ipynb runs top to bottom with its tiny settings (a cell
``TINY = True`` is inserted after its parameters cell), so it cannot rot; and it is
kept in git without outputs."""

from __future__ import annotations

import os
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "TINY = False" in params[0].source


def test_quickstart_runs_with_tiny_settings(monkeypatch):
  nb = _read()
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell("TINY = True\nMAX_NEW_TOKENS = 4"))
  # The kernel inherits this environment (JAX on CPU, 8 simulated devices from
  # conftest: the library is split over them) and runs this interpreter.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "8 devices" in text and "split over 8 devices" in text, text
  assert ">>> What is the capital of France?" in text, text
  assert "adapters used across layers and tokens" in text, text
  assert any("image/png" in o.get("data", {}) for o in outputs), "no routing plot"
