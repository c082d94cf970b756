"""The XLA flags jaxspec sets, in one place (applied by `import jaxspec`, before jax starts).

XLA reads `XLA_FLAGS` once, when the first backend starts, and a flag a program's
`compiler_options` names does not reach the CPU scheduler, so the flags go into the environment
at `import jaxspec`. That works when jaxspec is imported before anything has run a jax
computation (`import jax` alone is fine); later, `applied()` is False and the flags wait for the
next process. Every flag here only changes how XLA schedules work it would do anyway (outputs
are bit-identical); backends other than the one a flag names ignore it.

- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler orders a
  program to run independent thunks concurrently, which on a decode step (a chain of matvecs,
  each already split over the cores by Eigen) makes them contend for memory bandwidth. Off, the
  Qwen2.5-Coder-0.5B decode step at 160 live slots went 149 -> 82 ms and the T=5 verify pass
  186 -> 126 ms (2-core CPU, stacked weights, best of 5); SmolLM2-135M was unchanged (26 ms).
  docs/performance.md has the table.

Opt out with `JAXSPEC_XLA_FLAGS=0`; a flag already in `XLA_FLAGS` (either value) is left alone.
"""

from __future__ import annotations

import os
import sys

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
MIN_JAXLIB = (0, 10)  # the oldest jaxlib the flags were checked on (older ones may not know them)
OPT_OUT = "JAXSPEC_XLA_FLAGS"


def _jaxlib_version() -> tuple[int, ...] | None:
  from importlib import metadata
  try:
    text = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None
  parts = []
  for p in text.split(".")[:3]:
    digits = "".join(ch for ch in p if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def wanted(environ=os.environ) -> tuple[str, ...]:
  """The flags `apply` would add to `environ["XLA_FLAGS"]` now."""
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return ()
  version = _jaxlib_version()
  if version is None or version[:2] < MIN_JAXLIB:
    return ()
  current = environ.get("XLA_FLAGS", "")
  return tuple(f for f in CPU_FLAGS if f.split("=")[0] not in current)


def backend_started() -> bool:
  """Whether jax has already started a backend in this process (flags set now are ignored)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def apply(environ=os.environ) -> tuple[str, ...]:
  """Adds the missing flags to `environ["XLA_FLAGS"]`; returns those added."""
  add = wanted(environ)
  if add:
    environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "").strip(), *add]).strip()
  return add


def applied() -> bool:
  """Whether this process's backend runs with jaxspec's flags (for bench reports)."""
  current = os.environ.get("XLA_FLAGS", "")
  return all(f in current for f in CPU_FLAGS) and not _STARTED_BEFORE_IMPORT


_STARTED_BEFORE_IMPORT = backend_started()  # jaxspec imported after jax ran: flags come too late
