"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel python3, cwd notebooks/).

Each notebook runs in its own process with its own kernel, all at once (compiles are
single-threaded, so they share the cores well). The kernels get their own environment: CPU
only, 8 simulated devices for the sharding notebook, one XLA intra-op thread each so they do
not fight the test process (or an xdist worker) for the cores, and most XLA optimizations off
(tiny models: compile time dominates).
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; a whole notebook takes 15-50 s on a 2-core CPU
TOTAL_TIMEOUT = 600

RUNNER = r"""
import sys, nbformat, nbclient
path, out = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
first = next(c for c in nb.cells if c.cell_type == "code")
assert "JAXSPEC_SRC" in first.source, "the first code cell must be the Colab install cell"
client = nbclient.NotebookClient(nb, timeout=int(sys.argv[3]), kernel_name="python3",
                                 resources={"metadata": {"path": sys.argv[4]}})
try:
  client.execute()
finally:
  nbformat.write(nb, out)
"""


def kernel_env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
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


def test_notebooks_run(tmp_path):
  env = kernel_env()
  procs = {}
  for path in PATHS:
    out = tmp_path / path.name
    log = open(tmp_path / f"{path.stem}.log", "w")
    procs[path.name] = (subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(path), str(out), str(CELL_TIMEOUT), str(NOTEBOOKS)],
        cwd=NOTEBOOKS, env=env, stdout=log, stderr=subprocess.STDOUT), log, out)
  deadline = time.monotonic() + TOTAL_TIMEOUT
  failures = []
  for name, (proc, log, out) in procs.items():
    try:
      rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "timeout"
    log.close()
    if rc != 0:
      text = (tmp_path / f"{pathlib.Path(name).stem}.log").read_text()
      failures.append(f"{name}: exit {rc}\n{text[-3000:]}")
  assert not failures, "\n\n".join(failures)
