"""Markdown reports shared by `jaxspec bench` and the perf tools: the machine line, the command
line that made a section, and replacing one section of a report in place."""

from __future__ import annotations

import os
import platform
import shlex
import sys


def machine() -> str:
  """One line: device kind and count, host cores, architecture, jax version."""
  import jax

  dev = jax.devices()[0]
  return (f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {jax.device_count()} device(s), "
          f"{os.cpu_count()} host cores, {platform.machine()}, jax {jax.__version__}")


def device_kind() -> str:
  import jax

  dev = jax.devices()[0]
  return getattr(dev, "device_kind", dev.platform)


def command() -> str:
  """The command line that is running, as `jaxspec ...`."""
  return "jaxspec " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def update(path: str, key: str, section: str) -> None:
  """Replaces the section marked `key` in the report at `path` (or appends it), keeping the
  others."""
  begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
  block = f"{begin}\n{section}\n{end}"
  text = open(path).read() if os.path.exists(path) else (
      "# Benchmarks\n\nMade by `jaxspec bench`; every section names the command that made it.\n")
  if begin in text and end in text:
    pre, rest = text.split(begin, 1)
    text = pre + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def write(out: str, key: str, md: str) -> None:
  """Prints a section and, unless `out` is '-', replaces its block (one per key and device
  kind) in the report `out`."""
  print(md)
  if out != "-":
    update(out, f"{key}:{device_kind()}", md)
