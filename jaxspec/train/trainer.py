"""The training loop: optax AdamW (warmup + cosine decay, clipping), Orbax checkpoints with exact
resume, a tqdm bar with the loss and the held-out tau measured by the real engine."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxspec import interrupt, validate
from jaxspec.models import Model

from . import data as data_lib
from . import objectives

STATE_DIR = "state"
DATA_DIR = "data"
DRAFTER_DIR = "drafter"
CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.json"


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Static optimizer settings (a jit static argument, with the objective)."""

  steps: int
  lr: float
  warmup: int
  weight_decay: float
  clip: float
  end_lr_frac: float = 0.1

  def optimizer(self):
    import optax
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=self.lr, warmup_steps=self.warmup,
        decay_steps=max(self.steps, self.warmup + 1), end_value=self.lr * self.end_lr_frac)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on biases/norms
    return optax.chain(optax.clip_by_global_norm(self.clip),
                       optax.adamw(sched, weight_decay=self.weight_decay, mask=decay_mask))


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # [] int32
  rng: jax.Array  # [2] uint32: the data/noise key (batches are a pure function of it and step)


def _step(obj, hyper: Hyper, state: TrainState, tparams, tokens, lens, feats):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  (_, metrics), grads = jax.value_and_grad(obj.loss, has_aux=True)(
      state.params, tparams, tokens, lens, feats, key)
  import optax
  updates, opt_state = hyper.optimizer().update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


_train_step = jax.jit(_step, static_argnums=(0, 1), donate_argnums=2)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: nothing (one device, jit's default) or a ("data", "tensor")
  mesh. On a mesh the step is data parallel (the batch's rows over "data"; XLA sums the
  gradients across it) and tensor parallel where the weights allow (the target's head and
  layers by `sharding.PARAM_AXES`; the drafter's weights and their optimizer moments by the
  same names, the rest replicated)."""

  mesh: Any = None

  def state(self, state: TrainState):
    return None if self.mesh is None else _sharding().param_shardings(state, self.mesh)

  def target(self, tparams):
    return None if self.mesh is None else _sharding().param_shardings(tparams, self.mesh)

  def rows(self, x):
    return None if self.mesh is None else _sharding().batch_sharding(x, self.mesh)

  def replicated(self):
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(self.mesh, PartitionSpec())

  def put(self, tree, shardings):
    return tree if self.mesh is None else _sharding().place(tree, shardings)

  def step_fn(self, obj, hyper: Hyper, state: TrainState, tparams, batch):
    """The compiled step: (state, tparams, tokens, lens, feats) -> (state, metrics)."""
    if self.mesh is None:
      return functools.partial(_train_step, obj, hyper)
    st = self.state(state)
    return jax.jit(functools.partial(_step, obj, hyper), donate_argnums=0,
                   in_shardings=(st, self.target(tparams), *map(self.rows, batch)),
                   out_shardings=(st, self.replicated()))

  def gather(self, tree):
    """Every leaf whole on every process (the trained drafter leaves the mesh with it)."""
    if self.mesh is None:
      return tree
    full = jax.jit(lambda t: t, out_shardings=self.replicated())(tree)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), full)


def _sharding():
  from jaxspec import sharding
  return sharding


def _init_state(obj, hyper: Hyper, model: Model, seed: int) -> TrainState:
  params = obj.init(model, seed)
  return TrainState(params=params, opt_state=hyper.optimizer().init(params),
                    step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))


# ------------------------------------------------------------------------------ checkpoints


def _flat(state: TrainState) -> dict:
  """Orbax-friendly form: leaves keyed by index (optax states are namedtuples)."""
  return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}


def _unflat(template: TrainState, flat: dict) -> TrainState:
  leaves = [flat[k] for k in sorted(flat)]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


class _Checkpoints:
  def __init__(self, folder: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.mngr = ocp.CheckpointManager(
        folder, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                     enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, state: TrainState) -> None:
    step = int(state.step)
    if step in (self.mngr.all_steps() or []):
      return
    self.mngr.save(step, args=self._ocp.args.StandardSave(_flat(state)))
    self.mngr.wait_until_finished()

  def restore(self, step: int, template: TrainState, shardings=None) -> TrainState:
    """`shardings` (a tree like `template`, or None): where the restored leaves go, whatever
    mesh saved them (a run resumes on another mesh)."""
    flat = _flat(template)
    where = [None] * len(flat) if shardings is None else jax.tree.leaves(shardings)
    abstract = {key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                for (key, x), s in zip(flat.items(), where)}
    got = self.mngr.restore(step, args=self._ocp.args.StandardRestore(abstract))
    return _unflat(template, got)

  def close(self) -> None:
    self.mngr.close()


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{jax.process_index()}"  # every process of a job may write the same file
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ eval


def held_out_tau(obj, model: Model, params, prompts, *, k: int, max_new_tokens: int,
                 mesh=None) -> float:
  """Greedy tau of the current drafter on held-out prompts, measured by the real engine. Every
  round speculates: under `speculate="auto"` a drafter that does not yet pay for itself would
  fall back to plain rounds, which count as tau 1 and hide what the head has learned."""
  from jaxspec.api import generate
  out = generate(model, prompts, drafter=obj.drafter(model, params, k),
                 max_new_tokens=max_new_tokens, stop_tokens=(), mesh=mesh, speculate="always")
  return float(out.stats.mean_accepted)


# ------------------------------------------------------------------------------------ train

KINDS = ("eagle", "eagle3", "medusa", "hydra", "adapter", "distill")
# train_drafter's arguments that `jaxspec train-drafter` sets, by their command-line flags: the
# command prints errors about them with the flag (`--batch-size`, not `batch_size`).
FLAGS = {"kind": "--kind", "out_dir": "--out", "steps": "--steps", "data": "--data", "k": "--k",
         "batch_size": "--batch-size", "seq_len": "--seq-len", "lr": "--lr", "seed": "--seed",
         "eval_every": "--eval-every", "layers": "--layers", "num_prompts": "--num-prompts",
         "samples_per_prompt": "--samples-per-prompt", "model": "--model",
         "draft_vocab": "--draft-vocab", "mesh": "--mesh"}


def _bad(name: str, rule: str, value) -> ValueError:
  e = ValueError(f"{name} must be {rule}, got {validate.got(value)}")
  if name in FLAGS:
    e.cli_message = f"{FLAGS[name]} must be {rule}, got {value!r}"
  return e


def _check_arguments(model: Model, a: dict) -> None:
  """Every argument, before any work or any file is written (a bad --lr used to fail at step 3
  after a minute of data generation, medusa --k 0 after 40 s)."""
  if not isinstance(model, Model):
    raise TypeError(f"model must be a jaxspec Model, got {type(model).__name__}")
  if a["kind"] not in KINDS:
    raise ValueError(f"unknown drafter kind {a['kind']!r}: expected one of "
                     f"{', '.join(map(repr, KINDS))}")
  ints = {"steps": 1, "batch_size": 1, "seq_len": 2, "samples_per_prompt": 1, "eval_tokens": 1,
          "eval_prompts": 0}
  optional_ints = {"eval_every": 0, "layers": 1, "warmup": 0, "num_prompts": 1, "save_every": 1,
                   "draft_vocab": 2}
  for name, low in list(ints.items()) + list(optional_ints.items()):
    v = a[name]
    if v is None and name in optional_ints:
      continue
    if not validate.is_int(v) or v < low:
      rule = "a positive integer" if low == 1 else f"an integer >= {low}"
      raise _bad(name, rule + (" or None" if name in optional_ints else ""), v)
  if not validate.is_int(a["k"]) or not 1 <= a["k"] <= 64:
    raise _bad("k", "an integer in [1, 64]", a["k"])
  for name, positive in (("lr", True), ("clip", True), ("weight_decay", False),
                         ("temperature", False)):
    v = a[name]
    if not validate.is_real(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
      raise _bad(name, "a finite number " + ("> 0" if positive else ">= 0"), v)
  try:
    validate.seed(a["seed"])
  except ValueError:
    raise _bad("seed", "an integer in [0, 2**32)", a["seed"]) from None
  if a["data"] is not None and not isinstance(a["data"], (str, os.PathLike)):
    raise _bad("data", "a file path or None", a["data"])
  if not isinstance(a["out_dir"], (str, os.PathLike)):
    raise _bad("out_dir", "a directory path", a["out_dir"])
  for name in ("progress", "resume"):
    validate.flag(name, a[name])
  if a["callback"] is not None and not callable(a["callback"]):
    raise _bad("callback", "a function or None", a["callback"])
  v = model.config.vocab_size
  if a["draft_vocab"] is not None:
    if a["draft_vocab"] > v:
      raise _bad("draft_vocab", f"at most the target's vocabulary ({v}) or None", a["draft_vocab"])
    if a["kind"] == "distill":
      raise _bad("draft_vocab", "None for kind 'distill' (a distilled model drafts with "
                 "DraftModel(model, vocab=N))", a["draft_vocab"])
    if a["kind"] == "adapter":
      raise _bad("draft_vocab", "None for kind 'adapter' (a Kangaroo adapter reads out "
                 "through the target's own head)", a["draft_vocab"])
  if a["kind"] == "adapter" and a["layers"] is not None and not (
      validate.is_int(a["layers"]) and 1 <= a["layers"] < model.config.n_layers):
    raise _bad("layers", f"the adapter's exit layer, an integer in [1, "
               f"{model.config.n_layers - 1}] (the target has {model.config.n_layers} layers)",
               a["layers"])
  mesh = a["mesh"]
  if mesh is not None:
    from jax.sharding import Mesh
    if not isinstance(mesh, Mesh) or set(mesh.axis_names) != {"data", "tensor"}:
      raise _bad("mesh", "a ('data', 'tensor') mesh from jaxspec.sharding.make_mesh or None",
                 mesh)
    _sharding().check_divisible(model.config, mesh)
    if a["batch_size"] % mesh.shape["data"]:
      e = ValueError(f"batch_size={a['batch_size']} does not split over the mesh's "
                     f"{mesh.shape['data']} data shards; use a multiple of "
                     f"{mesh.shape['data']}")
      e.cli_message = (f"--batch-size {a['batch_size']} does not split over --mesh's "
                       f"{mesh.shape['data']} data shards; use a multiple of "
                       f"{mesh.shape['data']}")
      raise e
  if a["seq_len"] > model.config.max_seq_len:
    e = ValueError(f"seq_len={a['seq_len']} exceeds the model's context "
                   f"({model.config.max_seq_len})")
    e.cli_message = (f"--seq-len {a['seq_len']} exceeds the model's context "
                     f"({model.config.max_seq_len})")
    raise e


def _settings_mismatch(out_dir: str, diff: list, old: dict, new: dict) -> ValueError:
  there, now = [old.get(d) for d in diff], [new.get(d) for d in diff]
  e = ValueError(f"{out_dir} holds a run with other settings ({', '.join(diff)}: {there} there, "
                 f"{now} now); use the same settings to resume, resume=False to start over, or "
                 f"a new out_dir")
  flags = [FLAGS.get(d, d) for d in diff]
  e.cli_message = (f"{out_dir} holds a run with other settings ({', '.join(flags)}: {there} "
                   f"there, {now} now); pass the same settings to resume, --no-resume to start "
                   f"over, or a new --out")
  return e


def draft_ids(model: Model, ds, n: int):
  """The N target ids most frequent in the training data (prompts and the target's own
  generations), end-of-sequence ids always in; sorted."""
  from collections import Counter

  from jaxspec.drafters import vocab
  counts = Counter()
  for row, length in zip(ds.tokens, ds.lens):
    counts.update(np.asarray(row[:int(length)]).tolist())
  eos = model.tokenizer.eos_ids if model.tokenizer is not None else ()
  return vocab.ranked(counts, n, model.config.vocab_size, eos)


def train_drafter(model: Model, *, kind: str = "eagle", out_dir: str, steps: int, data: str | None = None,
                  k: int = 4, batch_size: int = 16, seq_len: int = 128, lr: float = 3e-3,
                  seed: int = 0, eval_every: int | None = None, progress: bool = True,
                  resume: bool = True, layers: int | None = None, warmup: int | None = None,
                  weight_decay: float = 0.01, clip: float = 1.0, num_prompts: int | None = 512,
                  samples_per_prompt: int = 2, temperature: float = 1.0, eval_prompts: int = 8,
                  eval_tokens: int = 64, save_every: int | None = None,
                  callback: Callable[[int, dict], None] | None = None,
                  draft_vocab: int | None = None, mesh=None, **objective_options):
  """Trains a drafter for `model` by self-distillation and saves it to `out_dir/drafter`.

  Args:
    kind: "eagle" (feature drafter, returns an `EagleHead`), "eagle3" (an `EagleHead` that
      reads low, middle and high target layers, trained with training-time test), "medusa"
      (k heads, returns `MedusaHeads`), "hydra" (k heads, each reading the token drafted
      before it, returns `HydraHeads`), "adapter" (a Kangaroo adapter over the target's first
      `layers` layers, returns an `AdapterHead` for `drafters.Kangaroo`) or "distill" (a small draft model from the target's
      first `layers` layers, returns a `jaxspec.Model` for `drafters.DraftModel`).
    out_dir: holds the data cache (data/), Orbax training checkpoints (state/), the run's
      settings and loss/tau history, and the trained drafter (drafter/).
    steps: optimizer steps (batches of `batch_size` sequences of `seq_len` tokens).
    data: a JSONL ({"prompt"|"text"|"turns"} per line) or text file (one prompt per line);
      None uses built-in prompts (story openings for TinyStories models, else Spec-Bench).
    k: draft length used for the held-out tau (and the number of Medusa heads).
    eval_every: steps between held-out tau measurements (0: only at the end).
    resume: continue from the latest checkpoint in out_dir (bit-identical to an uninterrupted
      run: batches and noise are pure functions of (seed, step)); False starts over.
    layers: EAGLE decoder layers / Medusa blocks per head / distilled model depth / the
      adapter's exit layer (default: an eighth of the target's layers).
    num_prompts, samples_per_prompt, temperature: the generated training set (the first
      sample of each prompt is greedy, the others sampled at `temperature`).
    eval_prompts, eval_tokens: the held-out set for tau.
    callback: called as callback(step, metrics) after every step.
    draft_vocab: eagle / medusa / hydra: read out over the N target tokens most frequent in the
      training data (FR-Spec; `jaxspec.drafters.vocab`) instead of all V: each draft step's
      head and each training step's softmax cost N/V of the full ones. Lossless; None keeps
      the full vocabulary.
    mesh: a ("data", "tensor") mesh (`jaxspec.sharding.make_mesh`, every process of a
      multi-host job passes the same one): the training set is generated and the target's
      features computed sharded over it, and each step runs data parallel (rows of the batch
      over "data", `batch_size` a multiple of its size) and tensor parallel (the target's head
      and the drafter's weights that share the target's names over "tensor"). Up to float
      summation order the losses are those of one device. Checkpoints hold whole arrays
      (Orbax), so a run resumes on any mesh or on none. None: one device.
    objective_options: kind-specific loss settings (eagle: reg_weight, ce_weight, noise;
      eagle3: feature_layers (default `drafters.eagle.eagle3_layers`), ttt (training-time-test
      steps, default 3), decay; medusa: decay).
  """
  from tqdm.auto import tqdm

  _check_arguments(model, dict(
      kind=kind, out_dir=out_dir, steps=steps, data=data, k=k, batch_size=batch_size,
      seq_len=seq_len, lr=lr, seed=seed, eval_every=eval_every, progress=progress, resume=resume,
      layers=layers, warmup=warmup, weight_decay=weight_decay, clip=clip, num_prompts=num_prompts,
      samples_per_prompt=samples_per_prompt, temperature=temperature, eval_prompts=eval_prompts,
      eval_tokens=eval_tokens, save_every=save_every, callback=callback,
      draft_vocab=draft_vocab, mesh=mesh))
  steps, batch_size, seq_len, k, seed = int(steps), int(batch_size), int(seq_len), int(k), int(seed)
  taps = objectives.make(kind, model, k=k, layers=layers,  # checks the options
                         **objective_options).feature_layers
  warmup = max(1, steps // 20) if warmup is None else warmup
  hyper = Hyper(steps=steps, lr=float(lr), warmup=int(warmup), weight_decay=float(weight_decay),
                clip=float(clip))
  if eval_every is None:
    eval_every = max(1, steps // 5)
  if save_every is None:
    save_every = max(1, min(500, steps // 5))

  out_dir = os.path.abspath(os.fspath(out_dir))
  settings = {"kind": kind, "model": str(model.name), "steps": steps, "data": data, "k": k,
              "batch_size": batch_size, "seq_len": seq_len, "lr": float(lr), "seed": seed,
              "layers": layers, "warmup": hyper.warmup, "weight_decay": hyper.weight_decay,
              "clip": hyper.clip, "num_prompts": num_prompts,
              "samples_per_prompt": samples_per_prompt, "temperature": temperature,
              "eval_prompts": eval_prompts, "options": objective_options,
              "draft_vocab": draft_vocab}
  settings = json.loads(json.dumps(settings))
  cfg_file = os.path.join(out_dir, CONFIG_FILE)
  state_dir = os.path.join(out_dir, STATE_DIR)
  if resume and os.path.exists(cfg_file):
    with open(cfg_file) as f:
      old = json.load(f)
    diff = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
    if diff:
      raise _settings_mismatch(out_dir, diff, old, settings)

  # Prompts (the data file is read, every problem reported) before anything is written.
  max_prompt = max(1, seq_len // 2)
  prompts = data_lib.encode_prompts(model, data, max_prompt)
  train_p, held = data_lib.split_prompts(prompts, seed=seed, n_train=num_prompts,
                                         n_eval=eval_prompts)

  # Data: the target's own generations and features (cached in out_dir/data; its meta.json,
  # written last, marks a complete set, so an interrupted build is simply redone).
  os.makedirs(out_dir, exist_ok=True)
  ds = data_lib.build(model, train_p, os.path.join(out_dir, DATA_DIR), seq_len=seq_len,
                      samples=samples_per_prompt, temperature=temperature, seed=seed,
                      progress=progress, mesh=mesh, taps=taps)
  ids = None if draft_vocab is None else draft_ids(model, ds, int(draft_vocab))
  obj = objectives.make(kind, model, k=k, layers=layers, ids=ids, **objective_options)
  # The run starts here: only now are its settings recorded (a run that failed or was stopped
  # before this point leaves nothing that would refuse the next attempt).
  if not resume and os.path.isdir(state_dir) and jax.process_index() == 0:
    shutil.rmtree(state_dir)
  if jax.process_count() > 1:  # no process saves into the folder before it is cleared
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxspec train_drafter start")
  _write_json(cfg_file, settings)

  # State: fresh, or the latest checkpoint; placed on the mesh, if any.
  place = Placement(mesh)
  tparams = place.put(model.params, place.target(model.params))
  state = _init_state(obj, hyper, model, seed)
  state_sh = place.state(state)
  state = place.put(state, state_sh)
  ckpts = _Checkpoints(state_dir)
  history: list[dict] = []
  hist_file = os.path.join(out_dir, HISTORY_FILE)
  start = ckpts.latest() if resume else None
  if start is not None:
    if progress:
      tqdm.write(f"resuming from step {start}", file=sys.stderr)
    state = ckpts.restore(start, state, state_sh)
    if os.path.exists(hist_file):
      with open(hist_file) as f:
        history = [h for h in json.load(f) if h["step"] <= start]
  step = int(state.step)

  def evaluate():
    if not held:
      return None
    tau = held_out_tau(obj, model, state.params, held, k=k, max_new_tokens=eval_tokens,
                       mesh=mesh)
    history.append({"step": step, "tau": tau})
    return tau

  def save():
    ckpts.save(state)
    _write_json(hist_file, history)

  t0 = time.perf_counter()
  bar = tqdm(total=steps, initial=step, desc=f"train {kind}", unit="step", disable=not progress)
  postfix: dict[str, str] = {}
  tau = None
  train_step = rows = None
  # Ctrl-C in `jaxspec train-drafter` stops at the next step boundary, saves, then exits 130
  # (jaxspec.interrupt; a library caller gets KeyboardInterrupt as usual, same saving).
  with interrupt.graceful():
    try:
      if step == 0 and eval_every:
        tau = evaluate()
        if tau is not None:
          postfix["tau"] = f"{tau:.2f}"
          bar.set_postfix(postfix)
      while step < steps:
        interrupt.check()
        batch = ds.batch(seed, step, batch_size)
        if train_step is None:
          train_step = place.step_fn(obj, hyper, state, tparams, batch)
          rows = tuple(place.rows(x) for x in batch)
        state, metrics = train_step(state, tparams, *place.put(batch, rows))
        step += 1
        if callback is not None or step % 10 == 0 or step == steps or step == 1:
          m = {key: float(v) for key, v in jax.device_get(metrics).items()}
          if not all(math.isfinite(v) for v in m.values()):
            raise FloatingPointError(f"non-finite training metrics at step {step}: {m}")
          history.append({"step": step, **m})
          postfix.update(loss=f"{m['loss']:.4f}", acc=f"{m['acc']:.2f}")
          bar.set_postfix(postfix)
          if callback is not None:
            callback(step, m)
        bar.update(1)
        if eval_every and step % eval_every == 0 and step < steps and held:
          tau = evaluate()
          postfix["tau"] = f"{tau:.2f}"
          bar.set_postfix(postfix)
        if step % save_every == 0:
          save()
    except BaseException:
      # Keep what was done: the state is always that of the last finished step.
      try:
        save()
      except Exception:  # noqa: BLE001 (the original error matters more)
        pass
      ckpts.close()
      bar.close()
      raise
  if held and not any("tau" in h and h["step"] == steps for h in history):
    tau = evaluate()
    postfix["tau"] = f"{tau:.2f}"
    bar.set_postfix(postfix)
  bar.close()
  save()
  ckpts.close()

  losses = [h for h in history if "loss" in h]
  taus = [h for h in history if "tau" in h]
  meta = {"kind": "eagle" if kind == "eagle3" else kind,  # the checkpoint's (drafter) kind
          "trained_as": kind, "target": str(model.name), "steps": steps, "seed": seed,
          "final_loss": losses[-1]["loss"] if losses else None,
          "tau": taus[-1]["tau"] if taus else None, "tau_k": k,
          "train_seconds": round(time.perf_counter() - t0, 1)}
  result = obj.result(model, place.gather(state.params), meta)
  from jaxspec import checkpoint
  checkpoint.save(result, os.path.join(out_dir, DRAFTER_DIR), meta=meta, overwrite=True)
  return result
