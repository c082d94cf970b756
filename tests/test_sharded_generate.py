"""Sharded speculative decoding on 8 simulated CPU devices, and across two real processes."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxspec
from jaxspec import drafters, engine, session, sharding, trees

PROMPTS = ["Once upon a time", "Tom and his dog went to the", "The little bird",
           "Lily wanted to play"]
N_NEW = 16
TREE = trees.Static.from_branching((2, 2))


def chain():
  return drafters.EarlyExit(layers=3, k=3)


def tree_drafter(model):
  return drafters.DraftModel(model, tree=TREE)


@pytest.fixture(scope="module")
def single(stories):
  return {"chain": jaxspec.generate(stories, PROMPTS, drafter=chain(), max_new_tokens=N_NEW,
                                    stop_tokens=()).tokens,
          "tree": jaxspec.generate(stories, PROMPTS, drafter=tree_drafter(stories),
                                   max_new_tokens=N_NEW, stop_tokens=()).tokens}


@pytest.mark.parametrize("data,tensor", [(1, 8), (8, 1), (2, 4)])
def test_mesh_equals_single_device(stories, single, data, tensor):
  mesh = sharding.make_mesh(data=data, tensor=tensor)
  model = jaxspec.Model(stories.config, sharding.shard_params(stories.params, mesh),
                        stories.tokenizer, stories.name)
  for kind, d in [("chain", chain()), ("tree", tree_drafter(model))]:
    out = jaxspec.generate(model, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(),
                           mesh=mesh)
    assert out.tokens == single[kind], (data, tensor, kind)
  # Plain decoding too, with params placed by generate itself (not pre-sharded).
  plain = jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=(), mesh=mesh)
  assert plain.tokens == jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW,
                                          stop_tokens=()).tokens


def test_loop_has_no_weight_all_gather(stories):
  """The compiled speculative loop never all-gathers a whole weight (per layer or stacked)."""
  mesh = sharding.make_mesh(data=2, tensor=4)
  pr = session.prepare(stories, PROMPTS, drafter=chain(), max_new_tokens=N_NEW,
                       temperature=0.0, top_k=None, top_p=None, seed=0, stop_tokens=(), mesh=mesh)
  state, _ = session.start(stories, pr)
  exe, _ = engine.compiled("run", pr.spec, stories.params, pr.dparams, pr.inputs, state,
                           jnp.asarray(1, jnp.int32), mesh=mesh)
  hlo = exe.compiled.as_text()
  weight_shapes = set()
  for w in jax.tree.leaves(stories.params):
    dims = list(w.shape)
    weight_shapes.add(",".join(map(str, dims)))
    weight_shapes.add(",".join(map(str, dims[1:])))  # one layer of a stacked weight
  # Result shapes of every all-gather instruction (sync or async start).
  gathered = re.findall(r"= \(?\w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
  assert gathered, "expected the small per-round all-gathers of new KV entries"
  offenders = [s for s in gathered if s in weight_shapes and s.count(",") >= 1]
  assert not offenders, offenders
  assert "while" in hlo  # the loop is one compiled program


def test_mesh_that_does_not_divide_heads(stories):
  import dataclasses
  cfg = dataclasses.replace(stories.config, n_heads=4, n_kv_heads=4, head_dim=16)
  bad = jaxspec.Model(cfg, stories.params, stories.tokenizer)
  with pytest.raises(ValueError, match="heads"):
    jaxspec.generate(bad, ["Once"], max_new_tokens=2, mesh=sharding.make_mesh(data=1, tensor=8))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(stories):
  """Two local processes (4 CPU devices each) run one sharded generate on a 2x4 mesh and both
  print the single-process tokens."""
  prompts = PROMPTS[:2]
  coordinator = f"127.0.0.1:{_free_port()}"
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  procs = [subprocess.Popen([sys.executable, worker, str(i), coordinator, json.dumps(prompts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  want = {"chain": jaxspec.generate(stories, prompts, drafter=chain(), max_new_tokens=16,
                                    stop_tokens=()).tokens,
          "tree": jaxspec.generate(stories, prompts, drafter=drafters.EarlyExit(
              layers=3, tree=TREE), max_new_tokens=16, stop_tokens=()).tokens}
  assert results[0] == results[1] == want


def test_sharded_model_without_mesh_argument(stories, single):
  """A model already placed on a mesh works without mesh= (its own program, not a stale one
  compiled for unsharded arguments of the same shapes)."""
  mesh = sharding.make_mesh(data=2, tensor=4)
  model = jaxspec.Model(stories.config, sharding.shard_params(stories.params, mesh),
                        stories.tokenizer, stories.name)
  out = jaxspec.generate(model, PROMPTS, drafter=chain(), max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == single["chain"]
