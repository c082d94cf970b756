"""One generation session on the compiled engine: plan, start, run rounds, fetch.

`generate`, `stream` and the adaptive policy all drive the engine through these functions:

    plan = prepare(model, prompts, drafter=..., max_new_tokens=..., ...)  # validate, pad, bucket
    state, compile_s = start(model, plan)           # the compiled prefill
    state, compile_s = run_rounds(model, plan, state, max_rounds)   # the compiled loop
    seq, n = fetch((state.seq, state.n))            # device -> host once

Every shape is fixed by the plan (batch bucket, prompt bucket, buffer length), so another
prompt in the same buckets, another `max_new_tokens` that fits the same buffer bucket, other
sampling values or another seed never recompile.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import engine, sampling, validate
from jaxspec.drafters.base import Drafter, NoDraft
from jaxspec.models import Model

SPECULATE = ("auto", "always")
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BUF_ALIGN = 128


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


def batch_bucket(b: int) -> int:
  return 1 << (b - 1).bit_length() if b > 1 else 1


def encode_prompts(model: Model, prompts) -> list[list[int]]:
  """Checked prompts (jaxspec.validate: ints for ids, encodable text) -> token ids in the
  vocabulary."""
  out = []
  for i, p in enumerate(validate.prompts(prompts)):
    if isinstance(p, str):
      if model.tokenizer is None:
        raise ValueError(f"{model.name!r} has no tokenizer: pass token ids instead of text")
      p = model.tokenizer.encode(p)
    out.append(validate.in_vocab(i, p, model.config.vocab_size))
  return out


def stop_array(model: Model, stop_tokens, batch: int) -> np.ndarray:
  eos = model.tokenizer.eos_ids if model.tokenizer else ()
  rows = validate.stop_rows(stop_tokens, batch, model.config.vocab_size, default=eos,
                           max_stop=engine.MAX_STOP)
  arr = np.full((batch, engine.MAX_STOP), -1, np.int32)
  for i, r in enumerate(rows):
    arr[i, :len(r)] = r
  return arr


@dataclasses.dataclass
class Plan:
  """Everything fixed for one call: the program spec, padded inputs, traced values."""

  spec: engine.EngineSpec
  dparams: object
  prompt: np.ndarray
  lens: np.ndarray
  live: np.ndarray
  inputs: engine.Inputs
  key: jax.Array
  batch: int
  max_new: int
  mesh: object = None


def prepare(model: Model, prompts, *, drafter=None, max_new_tokens: int = 128,
            temperature: float = 0.0, top_k=None, top_p=None, seed: int = 0, stop_tokens=None,
            mesh=None, speculate: str | None = None) -> Plan:
  """Validates every argument, tokenizes and pads the prompts, binds the drafter and fixes the
  program's shapes (batch and prompt buckets, buffer length).

  speculate: "auto" compiles the speculation switch with a drafter (each round speculates
  only when it is predicted to pay; `jaxspec.policy` sets its measured cost ratio), "always"
  speculates every round; None: $JAXSPEC_SPECULATE, else "auto"."""
  if speculate is None:
    speculate = os.environ.get("JAXSPEC_SPECULATE", "auto")
  if speculate not in SPECULATE:
    raise ValueError(f"speculate must be one of {SPECULATE}, got {speculate!r}")
  if not isinstance(model, Model):
    raise TypeError(f"model must be a jaxspec Model (from jaxspec.load_model), got "
                    f"{type(model).__name__}")
  if mesh is not None:
    from jaxspec import sharding
    sharding.check_divisible(model.config, mesh)
  max_new_tokens = validate.max_new_tokens(max_new_tokens)
  seed = validate.seed(seed)  # [0, 2**32): each its own stream, none reduced silently
  mode, sp = sampling.make(temperature, top_k, top_p)
  ids = encode_prompts(model, prompts)
  b = len(ids)
  longest = max(len(x) for x in ids)
  ctx = model.config.max_seq_len
  if longest > ctx:
    raise ValueError(f"prompt of {longest} tokens is longer than the model's context of {ctx}")
  if longest + max_new_tokens > ctx:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {ctx} tokens; lower max_new_tokens to at most "
                     f"{ctx - longest}")
  if drafter is None:
    dspec, dparams = NoDraft(k=0, target=model.config), None
  else:
    if not isinstance(drafter, Drafter):
      raise TypeError(f"drafter must be a jaxspec drafter (jaxspec.drafters.*), got "
                      f"{type(drafter).__name__}")
    dspec, dparams = drafter.bind(model)
  dspec = dspec.with_mode(mode)
  p = bucket(longest)
  bb = batch_bucket(b)
  if mesh is not None:  # rows split evenly over the data axis
    data = mesh.shape.get("data", 1)
    bb = -(-bb // data) * data
  buf = -(-(p + max_new_tokens + dspec.footprint + 1) // BUF_ALIGN) * BUF_ALIGN
  prompt = np.zeros((bb, p), np.int32)
  lens = np.ones((bb,), np.int32)
  for i, x in enumerate(ids):
    prompt[i, :len(x)] = x
    lens[i] = len(x)
  live = np.arange(bb) < b
  stop = stop_array(model, stop_tokens, b)
  stop = np.concatenate([stop, np.full((bb - b, engine.MAX_STOP), -1, np.int32)])
  switch = drafter is not None and speculate == "auto"
  spec = engine.EngineSpec(target=model.config, drafter=dspec, batch=bb, prompt_len=p,
                           buf_len=buf, switch=switch)
  inputs = engine.Inputs(sp=sp, max_new=jnp.asarray(max_new_tokens, jnp.int32),
                         stop=jnp.asarray(stop))
  if switch:  # until jaxspec.policy measures it: a speculative round costs a plain one
    inputs = inputs.replace(mode=jnp.asarray(engine.MODE_AUTO, jnp.int32),
                            ratio=jnp.asarray(1.0, jnp.float32),
                            margin=jnp.asarray(0.05, jnp.float32))
  return Plan(spec, dparams, prompt, lens, live, inputs, jax.random.key(seed), b,
              int(max_new_tokens), mesh)


def start(model: Model, pr: Plan, programs: engine.Programs | None = None):
  """The compiled prefill: (loop state, compile seconds; 0.0 when cached)."""
  args = (model.params, pr.dparams, jnp.asarray(pr.prompt), jnp.asarray(pr.lens),
          jnp.asarray(pr.live), pr.inputs, pr.key)
  exe, c1 = engine.compiled("prefill", pr.spec, *args, mesh=pr.mesh, programs=programs)
  state = exe(*args)
  return state, c1


def run_rounds(model: Model, pr: Plan, state, max_rounds: int,
               programs: engine.Programs | None = None):
  """Up to `max_rounds` rounds of the compiled loop (fewer when every row is done):
  (state, compile seconds). The state passed in is donated."""
  args = (model.params, pr.dparams, pr.inputs, state, jnp.asarray(max_rounds, jnp.int32))
  exe, c = engine.compiled("run", pr.spec, *args, mesh=pr.mesh, programs=programs)
  return exe(*args), c


def fetch(tree):
  """Device -> host once. An array over other processes' devices too (a global mesh) is
  gathered from every process (a collective they all run); a process-local one (one host's
  plan, `jaxspec run`'s shares) is read here alone, so no process waits on another that is not
  fetching."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(get, tree)


def check_finite(model: Model, bad) -> None:
  """Raises instead of returning tokens drawn from NaN/inf logits."""
  rows = [int(i) for i in np.flatnonzero(bad)]
  if rows:
    raise FloatingPointError(
        f"{model.name!r} produced non-finite logits (NaN or inf) for prompt row(s) {rows}; its "
        f"weights or activations are broken (a corrupt checkpoint, or float16 overflow: try "
        f"dtype='float32' or 'bfloat16'), so no tokens are returned")


