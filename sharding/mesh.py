"""Device meshes and multi-host start-up.

A jaxspec mesh has two axes, ("data", "tensor"). `jax.devices()` lists every process's
devices grouped by process, and "tensor" is the fastest-varying mesh axis, so as long as
`tensor` is at most the devices per host, tensor-parallel collectives stay inside one host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from .rules import DATA, TENSOR

ENV_COORDINATOR = "JAXSPEC_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSPEC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSPEC_PROCESS_ID"


def make_mesh(data: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ("data", "tensor") mesh over `devices` (default: every device of every process).

  One of `data` / `tensor` may be -1, meaning "all the devices the other leaves".
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, v in (("data", data), ("tensor", tensor)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f"make_mesh: {name} must be a positive int or -1 (the rest), got {v!r}")
  if data == -1 and tensor == -1:
    raise ValueError("make_mesh: only one of data / tensor may be -1")
  if data == -1 or tensor == -1:
    known = tensor if data == -1 else data
    if n % known:
      raise ValueError(f"make_mesh: {n} devices cannot be split into groups of {known}")
    data, tensor = (n // known, tensor) if data == -1 else (data, n // known)
  if data * tensor != n:
    raise ValueError(f"make_mesh: data={data} x tensor={tensor} = {data * tensor} devices, but "
                     f"{n} are available; use a shape whose product is {n}, -1 for one axis, "
                     f"or pass devices=")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh((data, tensor), devices)  # topology-aware on TPU
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(data, tensor)
  return Mesh(grid, (DATA, TENSOR))


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, **kwargs) -> bool:
  """Starts `jax.distributed` for a multi-host job; call it before any other JAX work.

  Each argument left None falls back to the environment: JAXSPEC_COORDINATOR ("host:port"),
  JAXSPEC_NUM_PROCESSES and JAXSPEC_PROCESS_ID. With nothing set (or one process) it does
  nothing, so single-host scripts can call it unconditionally. Extra keyword arguments go to
  `jax.distributed.initialize` (e.g. `local_device_ids`).

  auto=True (or JAXSPEC_AUTO_DISTRIBUTED=1) lets JAX discover the cluster itself, as it does on
  Cloud TPU pod slices, SLURM and Open MPI: use it on every host of a TPU pod.

  Returns True when it initialized the distributed runtime.
  """
  if auto or os.environ.get("JAXSPEC_AUTO_DISTRIBUTED") == "1":
    if jax.distributed.is_initialized():
      return False
    jax.distributed.initialize(**kwargs)
    return True
  if coordinator_address is None:
    coordinator_address = os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if coordinator_address is None and num_processes in (None, 1) and process_id in (None, 0):
    return False  # a single process: nothing to coordinate
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be at least 1, got {num_processes}")
  if num_processes is not None and num_processes > 1 and coordinator_address is None:
    raise ValueError(f"a {num_processes}-process job needs a coordinator address: pass "
                     f"coordinator_address='host:port' or set {ENV_COORDINATOR}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is out of range for {num_processes} processes")
  if jax.distributed.is_initialized():
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    # CPU processes (tests, CPU pods) need a collectives backend to talk to each other; it
    # has no effect on GPU or TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)
  return True
