"""The Colab notebooks in notebooks/ run top to bottom in a fresh python3 kernel on CPU, in their
fast setting (DSJAX_NOTEBOOK_FAST=1: few steps, short sequences); an error or a failed `assert`
in any cell fails the test. They are also checked to be stored without outputs."""

import os
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
  """A python3 kernel spec that runs this interpreter (an installed "python3" spec may name
  whichever `python` is first on PATH)."""
  directory = tmp_path_factory.mktemp("kernels")
  write_kernel_spec(directory / "python3")
  return KernelSpecManager(kernel_dirs=[str(directory)])


def test_all_notebooks_are_found():
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_inside_deepseek.ipynb", "03_sparse_attention.ipynb",
      "04_pytorch_parity.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  and (c.outputs or c.execution_count is not None)]
  assert not with_outputs, f"{path.name}: cells {with_outputs} hold outputs; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, kernel_specs):
  # The kernel inherits this environment: the fast setting, the checkout whose configs/ the
  # notebooks read (dsjax importable from it, so the Colab install cell does nothing), a
  # non-interactive matplotlib backend, and conftest's XLA flags. It runs in an empty
  # directory, where the notebooks write their runs.
  monkeypatch.setenv("DSJAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("DSJAX_REPO", str(ROOT))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  kernel = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
  client = NotebookClient(nb, km=kernel, timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  assert kernel.kernel_spec.argv[0] == sys.executable
