"""The safetensors reader: validated headers, tensors read lazily one at a time as numpy.

`Weights(folder)` covers `model.safetensors` or the shards `model.safetensors.index.json` names;
truncated or corrupt files are one-line ValueErrors naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

from .finite import check_finite
from .hf_config import read_json

# safetensors dtype codes numpy cannot hold natively, read from raw bytes via ml_dtypes.
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
             "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _header(path: str) -> tuple[dict[str, Any], int]:
  """Parses and validates a safetensors header: ({name: entry}, offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ValueError(f"{path}: truncated or corrupt safetensors file: the header claims {n} "
                       f"bytes but the file has only {size}")
    raw = f.read(n)
  try:
    header = json.loads(raw)
    if not isinstance(header, dict):
      raise ValueError("not an object")
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  for name, e in header.items():
    try:
      dt, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
      want = math.prod(shape) * _ITEMSIZE[dt]
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}: {e!r}") from err
    if end - begin != want:
      raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} ({dt} {shape}) "
                       f"spans {end - begin} bytes, expected {want}")
    if end > data_size:
      raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at data byte "
                       f"{end} but the data section has only {data_size} bytes")
  return header, 8 + n


class _File:
  """One safetensors file, opened lazily; tensors come back as host numpy arrays."""

  def __init__(self, path: str):
    self.path = path
    self.header, self.data_start = _header(path)
    self._handle = None

  def read(self, name: str) -> np.ndarray:
    e = self.header[name]
    if e["dtype"] in _RAW_DTYPES:  # numpy has no bfloat16/float8: map the raw bytes instead
      import ml_dtypes
      dt = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[e["dtype"]]))
      return np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + e["data_offsets"][0],
                       shape=tuple(e["shape"]))
    if self._handle is None:
      from safetensors import safe_open
      try:
        self._handle = safe_open(self.path, framework="numpy")
      except Exception as err:  # SafetensorError and friends
        raise ValueError(f"{self.path}: corrupt safetensors file ({err})") from err
    try:
      return self._handle.get_tensor(name)
    except Exception as err:
      raise ValueError(f"{self.path}: cannot read tensor {name!r} ({err})") from err


class Weights:
  """The tensors of a checkpoint directory, across a single file or an index of shards."""

  def __init__(self, folder: str):
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    self.files: dict[str, _File] = {}
    self.where: dict[str, str] = {}  # tensor name -> file path
    if os.path.exists(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
      for shard in sorted(set(weight_map.values())):
        p = os.path.join(folder, shard)
        if not os.path.exists(p):
          first = next(k for k, v in weight_map.items() if v == shard)
          raise FileNotFoundError(f"{index} lists shard {shard!r} (holding {first!r} and "
                                  f"others) but {p} does not exist")
        self.files[p] = _File(p)
      for name, shard in weight_map.items():
        p = os.path.join(folder, shard)
        if name not in self.files[p].header:
          raise ValueError(f"{index} places tensor {name!r} in {shard}, but that file has no "
                           f"such tensor")
        self.where[name] = p
    elif os.path.exists(single):
      self.files[single] = _File(single)
      self.where = {name: single for name in self.files[single].header}
    else:
      others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".safetensors")))
      hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
      raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                              f"{hint}")

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.files[self.where[name]].header[name]["shape"])

  def read(self, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Reads tensor `name`, checking it has the `shape` the config implies."""
    if name not in self.where:
      raise ValueError(f"checkpoint has no tensor {name!r} ({what}); files: "
                       f"{', '.join(os.path.basename(p) for p in self.files)}")
    got = self.shape(name)
    if got != tuple(shape):
      raise ValueError(f"{self.where[name]}: tensor {name!r} has shape {got} but config.json "
                       f"implies {tuple(shape)} ({what}); config and weights do not match")
    x = self.files[self.where[name]].read(name)
    check_finite(name, x, self.where[name])
    return x
