"""A lean GGUF v2/v3 reader: metadata as Python values, tensors as byte views of a memory map.

`gguf.GGUFReader` builds numpy views for every element of every metadata array, which takes
~15 s for a 151,936-token vocabulary on a slow CPU; this reads the same header in well under a
second. Layout (little-endian):

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x { string key | u32 type | value }        string = u64 len + bytes
                                                     array  = u32 elem type + u64 n + elems
    n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset }
    tensor data from the first multiple of general.alignment (default 32) after the infos
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  ne: tuple[int, ...]  # ne[0] varies fastest; numpy shape is reversed(ne)
  type_id: int
  offset: int  # absolute byte offset in the file
  n_bytes: int
  row_bytes: int  # bytes of one row of ne[0] values

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.ne))


class _Cursor:

  def __init__(self, buf):
    self.buf, self.pos = buf, 0

  def take(self, n: int):
    if self.pos + n > len(self.buf):
      raise EOFError(f"needs byte {self.pos + n}, the file has {len(self.buf)}")
    out = self.buf[self.pos:self.pos + n]
    self.pos += n
    return out

  def scalar(self, fmt: str):
    return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

  def value(self, kind: int):
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      sub, n = self.scalar("<I"), self.scalar("<Q")
      if sub == _STRING:
        return [self.string() for _ in range(n)]
      if sub == _ARRAY:
        return [self.value(self.scalar("<I")) for _ in range(n)]
      dt = np.dtype(_type(sub))
      return np.frombuffer(self.take(n * dt.itemsize), dt).tolist()
    return np.frombuffer(self.take(np.dtype(_type(kind)).itemsize), _type(kind))[0].item()


def _type(kind: int) -> str:
  if kind not in _SCALARS:
    raise ValueError(f"unknown metadata value type {kind}")
  return _SCALARS[kind]


class GGUF:
  """`fields` (key -> value), `tensors` (name -> Tensor) and `data(tensor)` of one file."""

  def __init__(self, path: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    self.path = path
    size = os.path.getsize(path)
    self._map = np.memmap(path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    c = _Cursor(memoryview(self._map))
    if bytes(c.take(4)) != b"GGUF":
      raise ValueError("bad magic")
    version = c.scalar("<I")
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; a huge number "
                       f"means a big-endian file)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    if n_tensors > size or n_kv > size:
      raise ValueError(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
    self.fields = {}
    for _ in range(n_kv):
      key = c.string()
      self.fields[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
      name = c.string()
      ne = tuple(c.scalar("<Q") for _ in range(c.scalar("<I")))
      infos.append((name, ne, c.scalar("<I"), c.scalar("<Q")))
    align = int(self.fields.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    self.tensors = {}
    for name, ne, type_id, offset in infos:
      try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
      except ValueError:
        block, type_size = 1, 0  # an unknown type: `gguf_file.dequantize` names it
      row = ne[0] // block * type_size if ne else type_size
      n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
      self.tensors[name] = Tensor(name, ne, type_id, start + offset, row * n_rows, row)

  def data(self, t: Tensor) -> np.ndarray:
    """The raw bytes of `t` as uint8 rows [n_rows, row_bytes] (a view of the memory map)."""
    return self._map[t.offset:t.offset + t.n_bytes].reshape(-1, t.row_bytes)
