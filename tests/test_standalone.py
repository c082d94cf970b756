"""The repository stands alone: no test reads outside it, and the documented API is there."""

import pathlib
import re
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def test_sharding_is_an_attribute_of_jaxspec():
  code = "import jaxspec; print(jaxspec.sharding.make_mesh.__name__)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "make_mesh"


def test_no_test_reads_outside_the_repository():
  """Golden outputs live in tests/data; real checkpoints come from `python -m jaxspec.fetch`."""
  outside = re.compile("|".join(["shared" + "/models", r"parents\[1\]\.parent", r"\.\./" + "shared"]))
  for path in TESTS.glob("*.py"):
    assert not outside.search(path.read_text()), path.name
  for name in ("stories260K", "smollm2-135m"):
    assert (TESTS / "data" / name / "golden_greedy.json").is_file()
