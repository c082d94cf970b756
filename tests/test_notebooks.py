"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel python3, cwd notebooks/).

The kernel is a separate process with its own environment: CPU only, 8 simulated devices for the
sharding notebook, and XLA limited to one intra-op thread so that it does not fight the test
process (or another xdist worker) for the cores.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds per cell; each notebook takes 10-50 s on a 2-core CPU


def kernel_env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compile-bound: tiny models, short runs
  env["MPLBACKEND"] = "agg"
  env["TOKENIZERS_PARALLELISM"] = "false"
  env["PYTHONWARNINGS"] = "ignore"
  # The kernel runs the interpreter of this test process (the venv with jaxspec installed).
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return env


def test_notebooks_exist():
  names = {p.name for p in PATHS}
  assert {"01_quickstart.ipynb", "02_your_hf_model.ipynb", "03_train_a_drafter.ipynb",
          "04_sharding.ipynb"} <= names


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  first = nb.cells[1] if nb.cells[0].cell_type == "markdown" else nb.cells[0]
  assert first.cell_type == "code" and "JAXSPEC_SRC" in first.source, "Colab install cell first"
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
      resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=kernel_env())
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
