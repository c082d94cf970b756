"""Orbax checkpoints of models and drafter heads.

    jaxspec.save_checkpoint(model, "ckpt/")      # or a head, or a params pytree + meta
    model = jaxspec.load_model("ckpt/")          # detected by its jaxspec_checkpoint.json
    head = jaxspec.checkpoint.load_head("medusa_ckpt/")

A checkpoint directory holds:
  jaxspec_checkpoint.json   format version, kind ("model" or a head kind), name, config,
                            tokenizer metadata, free-form `meta`
  params/                   the parameter pytree (Orbax `StandardCheckpointer`)
  tokenizer.json | tokenizer.model   the model's tokenizer, when it has one

Arrays are restored into a target built from the config (`llama.param_shapes`) with the saved
or requested dtype, on one device or sharded over a mesh, so a round trip is bit-identical and
a checkpoint saved on one topology restores onto another.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.models import layout, llama
from jaxspec.models.finite import check_tree
from jaxspec.models.config import ModelConfig, RopeScaling
from jaxspec.models.model import Model
from jaxspec.models.tokenizer import Tokenizer
from jaxspec.models.tokenizer import restore as restore_tokenizer

META_FILE = "jaxspec_checkpoint.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Checkpoint:
  """A restored non-model checkpoint (a drafter head or any params pytree)."""

  kind: str
  params: Any
  config: Any  # the saved config object (rebuilt dataclass when importable), or None
  meta: dict[str, Any]
  name: str | None = None


# ------------------------------------------------------------------------------------ encoding


def _encode(x: Any, where: str = "config") -> Any:
  """JSON-safe form of configs: dataclasses and tuples are tagged so they rebuild exactly."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    cls = type(x)
    out = {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}"}
    for f in dataclasses.fields(x):
      out[f.name] = _encode(getattr(x, f.name), f"{where}.{f.name}")
    return out
  if isinstance(x, tuple):
    return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
  if isinstance(x, list):
    return [_encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, dict):
    if not all(isinstance(k, str) for k in x):
      raise TypeError(f"cannot store {where} in {META_FILE}: dict keys must be strings")
    return {k: _encode(v, f"{where}.{k}") for k, v in x.items()}
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if hasattr(x, "item") and getattr(x, "shape", None) == ():  # numpy / jax scalars
    return x.item()
  raise TypeError(f"cannot store {where} (a {type(x).__name__}) in {META_FILE}; use JSON "
                  f"values, tuples or dataclasses")


def _decode(x: Any) -> Any:
  if isinstance(x, list):
    return [_decode(v) for v in x]
  if not isinstance(x, dict):
    return x
  if "__tuple__" in x:
    return tuple(_decode(v) for v in x["__tuple__"])
  fields = {k: _decode(v) for k, v in x.items() if k != "__dataclass__"}
  if "__dataclass__" not in x:
    return fields
  module, _, qualname = x["__dataclass__"].partition(":")
  try:
    cls = importlib.import_module(module)
    for part in qualname.split("."):
      cls = getattr(cls, part)
    return cls(**fields)
  except (ImportError, AttributeError, TypeError):
    return dict(fields, __dataclass__=x["__dataclass__"])  # keep the data when the class is gone


def _scalar(x):
  if hasattr(x, "item") and getattr(x, "shape", None) == ():  # numpy / jax scalars
    return x.item()
  raise TypeError(f"cannot store a {type(x).__name__} in {META_FILE}")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
  """Plain JSON values (configs built from numpy headers may hold numpy scalars)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=_scalar))


def config_from_dict(d: dict[str, Any], path: str = META_FILE) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{path}: unknown model config fields {unknown} (saved by a newer jaxspec?)")
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return ModelConfig(**d)


# ---------------------------------------------------------------------------------- tokenizers


def _save_tokenizer(tok: Tokenizer | None, folder: str) -> dict[str, Any] | None:
  return None if tok is None else tok.save(folder)


def _load_tokenizer(d: dict[str, Any] | None, folder: str) -> Tokenizer | None:
  if d is None:
    return None
  try:
    return restore_tokenizer(d, folder)
  except ValueError as e:
    raise ValueError(f"{os.path.join(folder, META_FILE)}: {e}") from e


# ---------------------------------------------------------------------------------------- save


def _prepare_dir(path: str, overwrite: bool) -> None:
  """Creates `path`, or clears the way to overwrite the jaxspec checkpoint already there."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory")
  entries = set(os.listdir(path)) if os.path.isdir(path) else set()
  if entries:
    ours = {META_FILE, META_FILE + ".tmp", PARAMS_DIR, "tokenizer.json", "tokenizer.model"}
    if META_FILE not in entries and entries - ours:
      raise FileExistsError(f"{path} is a non-empty directory that is not a jaxspec checkpoint; "
                            f"save to a new or empty directory")
    if not overwrite:
      raise FileExistsError(f"{path} already holds a jaxspec checkpoint (or an unfinished one); "
                            f"pass overwrite=True to replace it")
    if META_FILE in entries and jax.process_index() == 0:
      os.remove(os.path.join(path, META_FILE))  # no stale marker if this save fails midway
  os.makedirs(path, exist_ok=True)


def save(obj: Any, path: str | os.PathLike, *, meta: dict[str, Any] | None = None,
         overwrite: bool = False) -> str:
  """Saves a `Model`, a head, or a params pytree as an Orbax checkpoint directory.

  obj: a `Model`; or any object with `.params` and `.config` (a drafter head; its `.kind`, or
    `meta["kind"]`, names it); or a plain params pytree with `meta={"kind": ...}`.
  meta: extra JSON-able metadata stored alongside (returned by `load_head`).
  overwrite: replace an existing jaxspec checkpoint at `path`.
  Returns the absolute checkpoint path.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  meta = dict(meta or {})
  if isinstance(obj, Model):
    params = layout.stacked(obj.params)  # checkpoints hold the stacked form (models.layout)
    info = {"kind": "model", "name": obj.name, "config": config_to_dict(obj.config),
            "dtype": jnp.dtype(obj.dtype).name}
  else:
    if hasattr(obj, "params") and hasattr(obj, "config"):
      params, config = obj.params, obj.config
      kind = meta.pop("kind", None) or getattr(obj, "kind", None)
      name = getattr(obj, "name", None)
    else:
      params, config, kind, name = obj, meta.pop("config", None), meta.pop("kind", None), None
    if not isinstance(kind, str) or not kind or kind == "model":
      raise ValueError("a non-Model checkpoint needs a kind (e.g. 'medusa', 'eagle'): give the "
                       "object a `kind` attribute or pass meta={'kind': ...}")
    info = {"kind": kind, "name": name, "config": _encode(config)}
  leaves = jax.tree.leaves(params)
  if not leaves or not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
    raise TypeError("params must be a non-empty pytree of arrays")

  info["meta"] = _encode(meta, "meta")
  json.dumps(info)  # fail before writing anything

  if jax.process_count() > 1:
    # A multi-host job: a process-local array (a copy every process holds) is saved as host
    # data, by the primary process; arrays over the global mesh are saved shard by shard.
    params = jax.tree.map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
        params)
  _prepare_dir(path, overwrite)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, PARAMS_DIR), params, force=overwrite)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    if isinstance(obj, Model):
      info["tokenizer"] = _save_tokenizer(obj.tokenizer, path)
    info.update(format="jaxspec", version=FORMAT_VERSION)
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(path, META_FILE))  # the marker appears last, complete
  return path


# ---------------------------------------------------------------------------------------- load


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The contents of a checkpoint's jaxspec_checkpoint.json."""
  file = os.path.join(os.fspath(path), META_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: not a jaxspec checkpoint (no {META_FILE})")
  try:
    with open(file, encoding="utf-8") as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from e
  if info.get("format") != "jaxspec" or not isinstance(info.get("version"), int):
    raise ValueError(f"{file}: not a jaxspec checkpoint description")
  if info["version"] > FORMAT_VERSION:
    raise ValueError(f"{file}: format version {info['version']} is newer than this jaxspec "
                     f"supports ({FORMAT_VERSION})")
  if not os.path.isdir(os.path.join(os.fspath(path), PARAMS_DIR)):
    raise FileNotFoundError(f"{path}: checkpoint has no {PARAMS_DIR}/ directory")
  return info


def _open(params_dir: str):
  """(checkpointer, saved tree of array metadata with .shape/.dtype per leaf)."""
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  try:
    m = ckpt.metadata(params_dir)
  except Exception as e:  # orbax raises assorted errors on damaged directories
    raise ValueError(f"{params_dir}: cannot read Orbax metadata ({type(e).__name__}: {e})") from e
  m = getattr(m, "item_metadata", m)
  tree = getattr(m, "tree", m)
  if not jax.tree.leaves(tree):
    raise ValueError(f"{params_dir}: damaged Orbax checkpoint: its metadata lists no arrays "
                     f"(_METADATA or the manifest is missing or truncated)")
  return ckpt, tree


def _restore(ckpt, params_dir: str, shapes, saved, dtype, mesh, config=None):
  """Restores into ShapeDtypeStructs: `shapes` (a tree of tuples), the saved dtype unless
  `dtype` is given, on one device or sharded by `jaxspec.sharding.param_shardings`."""
  from jaxspec.models.hf import param_shardings

  def want(s, m):  # `dtype` converts floating weights; integer leaves (token ids) stay as saved
    cast = dtype is not None and jnp.issubdtype(m.dtype, jnp.floating)
    return jax.ShapeDtypeStruct(tuple(s), dtype if cast else m.dtype)

  shape_tree = jax.tree.map(want, shapes, saved, is_leaf=lambda s: isinstance(s, tuple))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shape_tree)
  else:
    shardings = param_shardings(shape_tree, mesh, config)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shape_tree, shardings)
  try:
    return ckpt.restore(params_dir, target)
  except Exception as e:  # tensorstore reports missing or damaged chunks as a bare Exception
    first = str(e).split(" See full TensorStore details")[0].splitlines()[0] if str(e) else ""
    raise ValueError(f"{params_dir}: damaged or truncated Orbax checkpoint, cannot restore "
                     f"parameters ({type(e).__name__}: {first})") from e


def load(path: str | os.PathLike, *, dtype=None, mesh=None) -> Model:
  """Loads a model checkpoint written by `save` (dtype: a jnp dtype, None = as saved)."""
  path = os.path.abspath(os.fspath(path))
  info = read_meta(path)
  if info.get("kind") != "model":
    raise ValueError(f"{path} holds a {info.get('kind')!r} checkpoint, not a model; load it "
                     f"with jaxspec.checkpoint.load_head")
  config = config_from_dict(info["config"], os.path.join(path, META_FILE))
  params_dir = os.path.join(path, PARAMS_DIR)
  ckpt, saved = _open(params_dir)
  saved_shapes = jax.tree.map(lambda m: tuple(m.shape), saved)
  want = llama.param_shapes(config)
  is_shape = lambda s: isinstance(s, tuple)
  llama.check_params(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), saved_shapes,
                                  is_leaf=is_shape), config)
  structure = lambda t: jax.tree.structure(t, is_leaf=is_shape)
  if structure(saved_shapes) != structure(want):
    raise ValueError(f"{path}: saved parameters have entries the saved config does not use")
  params = _restore(ckpt, params_dir, want, saved, dtype, mesh, config)
  check_tree(params, params_dir)
  tok = _load_tokenizer(info.get("tokenizer"), path)
  return Model(config=config, params=params, tokenizer=tok, name=info.get("name") or "model")


def load_head(path: str | os.PathLike, *, dtype=None, mesh=None) -> Checkpoint:
  """Loads a non-model checkpoint (a drafter head or params pytree) written by `save`."""
  path = os.path.abspath(os.fspath(path))
  info = read_meta(path)
  if info.get("kind") == "model":
    raise ValueError(f"{path} holds a model; load it with jaxspec.load_model")
  params_dir = os.path.join(path, PARAMS_DIR)
  ckpt, saved = _open(params_dir)
  shapes = jax.tree.map(lambda m: tuple(m.shape), saved)
  params = _restore(ckpt, params_dir, shapes, saved, dtype, mesh)
  check_tree(params, params_dir)
  return Checkpoint(kind=info["kind"], params=params, config=_decode(info.get("config")),
                    meta=_decode(info.get("meta") or {}), name=info.get("name"))

