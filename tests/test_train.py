"""Drafter training (jaxspec.train): loss falls and held-out tau rises, exact resume, trained
Eagle / Medusa / distilled drafters are lossless, head checkpoints round trip, clear errors.

CI-sized: stories260K, a few dozen steps on a small self-distilled set. Runs are module-scoped
and shapes are shared, so each program compiles once.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec import checkpoint, drafters, trees
from jaxspec.drafters.registry import parse as parse_drafter
from jaxspec.models import Model
from conftest import STORY_PROMPTS

# One worker builds this module's trained heads (module fixtures) once: `--dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train")

PROMPTS = STORY_PROMPTS
N_NEW = 24
STEPS = 60
SETTINGS = dict(steps=STEPS, batch_size=16, seq_len=64, num_prompts=64, samples_per_prompt=1,
                eval_every=30, eval_prompts=4, eval_tokens=32, progress=False, lr=3e-3)


def _train(model, kind, out_dir, **kw):
  return jaxspec.train.train_drafter(model, kind=kind, out_dir=str(out_dir), **{**SETTINGS, **kw})


def _history(out_dir):
  with open(os.path.join(out_dir, "history.json")) as f:
    return json.load(f)


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def eagle_head(stories, runs):
  return _train(stories, "eagle", runs / "eagle")


def _reuse_data(runs, name):
  """The same settings make the same data: reuse the eagle run's (skips regeneration)."""
  if not os.path.exists(runs / name):
    shutil.copytree(runs / "eagle" / "data", runs / name / "data")


@pytest.fixture(scope="module")
def eagle3_head(stories, runs):
  return _train(stories, "eagle3", runs / "eagle3")


@pytest.fixture(scope="module")
def medusa_heads(stories, runs, eagle_head):
  _reuse_data(runs, "medusa")
  return _train(stories, "medusa", runs / "medusa")


@pytest.fixture(scope="module")
def distilled(stories, runs, eagle_head):
  _reuse_data(runs, "distill")  # the first num_prompts of the split are the same
  return _train(stories, "distill", runs / "distill", eval_every=0, eval_prompts=0, layers=2)


@pytest.fixture(scope="module")
def plain(stories):
  return jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())


HEADS = {"eagle": "eagle_head", "eagle3": "eagle3_head", "medusa": "medusa_heads"}


@pytest.mark.parametrize("kind", ["eagle", "eagle3", "medusa"])
def test_loss_falls_and_tau_rises(request, runs, kind):
  head = request.getfixturevalue(HEADS[kind])
  hist = _history(runs / kind)
  losses = [h["loss"] for h in hist if "loss" in h]
  taus = [(h["step"], h["tau"]) for h in hist if "tau" in h]
  assert losses[-1] < 0.8 * losses[0], losses
  assert [s for s, _ in taus] == [0, 30, 60]
  assert taus[-1][1] > taus[0][1] + 0.2, taus  # measured with the real engine, greedy
  assert taus[-1][1] > {"eagle": 1.5, "eagle3": 1.5, "medusa": 1.2}[kind]
  assert head.meta["tau"] == pytest.approx(taus[-1][1])


@pytest.mark.parametrize("kind,k", [("eagle", 1), ("eagle", 4), ("eagle3", 4), ("medusa", 1),
                                    ("medusa", 4)])
def test_trained_greedy_equals_plain(request, stories, plain, kind, k):
  if kind.startswith("eagle"):
    d = drafters.Eagle(request.getfixturevalue(HEADS[kind]), k=k)
  else:
    d = drafters.Medusa(request.getfixturevalue("medusa_heads"), k=k)
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  assert out.stats.new_tokens == N_NEW * len(PROMPTS)
  assert 1.0 <= out.stats.mean_accepted <= k + 1
  if k == 4:
    assert out.stats.mean_accepted > 1.1  # trained drafts are accepted


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_trained_sampling_runs(request, stories, kind):
  head = request.getfixturevalue({"eagle": "eagle_head", "medusa": "medusa_heads"}[kind])
  d = drafters.Eagle(head) if kind == "eagle" else drafters.Medusa(head)
  out = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(),
                         temperature=0.8, seed=3)
  assert [len(t) for t in out.tokens] == [N_NEW] * 4
  assert out.stats.mean_accepted > 1.0


def _drafter(request, kind, **kw):
  if kind == "eagle":
    return drafters.Eagle(request.getfixturevalue("eagle_head"), **kw)
  return drafters.Medusa(request.getfixturevalue("medusa_heads"), **kw)


def _run(stories, d, **kw):
  return jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=(), **kw)


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_single_chain_tree_drafts_like_the_chain(request, stories, plain, kind):
  """A one-path tree proposes exactly the chain's greedy drafts: same output AND the same
  per-row acceptance, which pins the tree path's positions, parent features, masks and commit."""
  chain = _run(stories, _drafter(request, kind, k=4))
  tree = _run(stories, _drafter(request, kind, tree=trees.Static.chains(1, 4)))
  assert tree.tokens == chain.tokens == plain.tokens
  assert tree.stats.accepted == chain.stats.accepted
  assert tree.stats.target_calls == chain.stats.target_calls


TREES = {"static": trees.Static.from_branching((3, 2, 1, 1)),
         "dynamic": trees.Dynamic(nodes=16, topk=3, depth=4)}


@pytest.mark.parametrize("tree", ["static", "dynamic"])
@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_trained_tree_greedy_equals_plain(request, stories, plain, kind, tree):
  chain = _run(stories, _drafter(request, kind, k=4))
  out = _run(stories, _drafter(request, kind, tree=TREES[tree]))
  assert out.tokens == plain.tokens
  assert out.stats.new_tokens == N_NEW * len(PROMPTS)
  assert out.stats.mean_accepted > chain.stats.mean_accepted  # branches catch more
  sampled = _run(stories, _drafter(request, kind, tree=TREES[tree]), temperature=0.8, seed=3)
  assert [len(t) for t in sampled.tokens] == [N_NEW] * 4 and sampled.stats.mean_accepted > 1.0


def test_distill_draft_model_is_lossless(stories, plain, distilled, runs):
  assert isinstance(distilled, Model) and distilled.config.n_layers == 2
  hist = [h["loss"] for h in _history(runs / "distill") if "loss" in h]
  assert hist[-1] < hist[0]
  out = jaxspec.generate(stories, PROMPTS, drafter=drafters.DraftModel(distilled, k=4),
                         max_new_tokens=N_NEW, stop_tokens=())
  assert out.tokens == plain.tokens
  assert out.stats.mean_accepted > 1.2
  again = jaxspec.load_model(str(runs / "distill" / "drafter"))  # an ordinary model checkpoint
  _same(distilled.params, again.params)


def test_held_out_tau_counts_only_speculative_rounds(stories, eagle_head, monkeypatch):
  """The held-out tau measures acceptance: every round speculates even where the user's default
  (`JAXSPEC_SPECULATE=auto`) would fall back to plain rounds, which count as tau 1 (a SmolLM2
  EAGLE-3 head read 1.01 held out that way while it accepted 1.85 on training prompts)."""
  from jaxspec import api
  from jaxspec.train import trainer
  monkeypatch.setenv("JAXSPEC_SPECULATE", "auto")
  seen, generate = [], api.generate

  def spy(*a, **kw):
    seen.append(kw.get("speculate"))
    return generate(*a, **kw)

  monkeypatch.setattr(api, "generate", spy)

  class Objective:
    def drafter(self, model, params, k):
      return drafters.Eagle(eagle_head, k=k)

  tau = trainer.held_out_tau(Objective(), stories, None, PROMPTS, k=4, max_new_tokens=N_NEW)
  want = generate(stories, PROMPTS, drafter=drafters.Eagle(eagle_head, k=4),
                  max_new_tokens=N_NEW, stop_tokens=(), speculate="always")
  assert seen == ["always"] and tau == pytest.approx(want.stats.mean_accepted)


def test_resume_is_bit_exact(stories, eagle_head, runs):
  """Interrupted twice, resumed twice == never interrupted, bit for bit. The first interrupt
  (Ctrl-C at step 37) is saved on the way out; the second (at 50) is made a hard kill by
  deleting that save, so the run resumes from the periodic save at 48."""
  out = runs / "eagle_resumed"
  os.makedirs(out)
  shutil.copytree(runs / "eagle" / "data", out / "data")  # same data; skips regeneration

  def crash_at(n):
    def callback(step, metrics):
      if step == n:
        raise KeyboardInterrupt
    return callback

  with pytest.raises(KeyboardInterrupt):
    _train(stories, "eagle", out, callback=crash_at(37))
  assert sorted(os.listdir(out / "state")) == ["36", "37"] and not os.path.exists(out / "drafter")
  with pytest.raises(KeyboardInterrupt):
    _train(stories, "eagle", out, callback=crash_at(50))
  shutil.rmtree(out / "state" / "50")
  resumed = _train(stories, "eagle", out)
  _same(eagle_head.params, resumed.params)
  with pytest.raises(ValueError, match="other settings.*lr"):
    _train(stories, "eagle", out, lr=1e-3)


def test_head_checkpoints_round_trip(stories, plain, eagle_head, eagle3_head, medusa_heads, runs,
                                    tmp_path):
  for head, cls, kind in [(eagle_head, drafters.EagleHead, "eagle"),
                          (eagle3_head, drafters.EagleHead, "eagle3"),
                          (medusa_heads, drafters.MedusaHeads, "medusa")]:
    saved = cls.load(runs / kind)  # the run directory finds its drafter/
    _same(head.params, saved.params)
    assert saved.config == head.config and saved.meta["steps"] == STEPS
    path = head.save(tmp_path / kind)
    ckpt = checkpoint.load_head(path)
    assert ckpt.kind == cls.KIND and ckpt.config == head.config
    _same(head.params, ckpt.params)
    _same(head.params, jaxspec.checkpoint.load_head(
        jaxspec.save_checkpoint(head, tmp_path / f"{kind}2")).params)
  # Loaded heads (and the CLI's eagle:DIR / medusa:DIR) draft like the originals.
  assert eagle3_head.config.generation == 3 and eagle3_head.meta["trained_as"] == "eagle3"
  for spec, head in [(f"eagle:{runs / 'eagle'}", eagle_head),
                     (f"eagle:{runs / 'eagle3'}", eagle3_head),
                     (f"medusa:{tmp_path / 'medusa'}", medusa_heads)]:
    d = parse_drafter(spec, k=4)
    assert isinstance(d, (drafters.Eagle, drafters.Medusa))
    a = jaxspec.generate(stories, PROMPTS, drafter=d, max_new_tokens=N_NEW, stop_tokens=())
    b = jaxspec.generate(stories, PROMPTS, drafter=type(d)(head, k=4), max_new_tokens=N_NEW,
                         stop_tokens=())
    assert a.tokens == plain.tokens and a.stats.accepted == b.stats.accepted


def test_head_errors(stories, eagle_head, medusa_heads, runs):
  from conftest import tiny_model
  other = tiny_model()  # dim 32, vocab 64
  with pytest.raises(ValueError, match="trained for a model with dim 64 and vocabulary 512"):
    jaxspec.generate(other, [[1, 2, 3]], drafter=drafters.Eagle(eagle_head))
  with pytest.raises(ValueError, match="trained for a model with dim 64"):
    jaxspec.generate(other, [[1, 2, 3]], drafter=drafters.Medusa(medusa_heads))
  with pytest.raises(ValueError, match="needs at least k heads"):
    drafters.Medusa(medusa_heads, k=5)
  with pytest.raises(ValueError, match="not a 'medusa' head"):
    drafters.Medusa(str(runs / "eagle"))
  with pytest.raises(ValueError, match="expected a 'eagle' head"):
    drafters.Eagle(medusa_heads)
  with pytest.raises(ValueError, match="tree must be None"):
    drafters.Eagle(eagle_head, tree=object())
  with pytest.raises(ValueError, match="tree of depth 5 needs as many heads"):
    drafters.Medusa(medusa_heads, tree=trees.Static.chains(2, 5))
  with pytest.raises(ValueError, match="unknown drafter kind"):
    jaxspec.train.train_drafter(stories, kind="lookahead", out_dir=str(runs / "x"), steps=1)
  with pytest.raises(ValueError, match="medusa needs a checkpoint"):
    parse_drafter("medusa", k=4)


# ----------------------------------------------------------------------------------- Hydra


@pytest.fixture(scope="module")
def hydra_heads(stories, runs, eagle_head):
  _reuse_data(runs, "hydra")
  return _train(stories, "hydra", runs / "hydra")


def test_hydra_learns_and_is_lossless(stories, plain, runs, hydra_heads, medusa_heads):
  """Hydra heads train like Medusa's (same data, steps and loss), their held-out tau rises, and
  greedy output equals plain decoding for chains (k 1 and 4) and both tree kinds."""
  taus = [h["tau"] for h in _history(runs / "hydra") if "tau" in h]
  medusa_taus = [h["tau"] for h in _history(runs / "medusa") if "tau" in h]
  assert taus[-1] > taus[0] + 0.2 and taus[-1] > 1.2, taus
  # each head sees the token before its own: deeper drafts are accepted more often than
  # Medusa's blind ones after the same training
  assert taus[-1] >= medusa_taus[-1], (taus, medusa_taus)
  for d in (drafters.Hydra(hydra_heads, k=1), drafters.Hydra(hydra_heads, k=4),
            drafters.Hydra(hydra_heads, tree=TREES["static"]),
            drafters.Hydra(hydra_heads, tree=TREES["dynamic"])):
    out = _run(stories, d)
    assert out.tokens == plain.tokens, d
  assert _run(stories, drafters.Hydra(hydra_heads, k=4)).stats.mean_accepted > 1.2


def test_hydra_round_trip_and_cli(stories, plain, runs, hydra_heads, tmp_path):
  saved = drafters.HydraHeads.load(runs / "hydra")
  _same(hydra_heads.params, saved.params)
  assert saved.config == hydra_heads.config
  d = parse_drafter(f"hydra:{runs / 'hydra'}", k=4)
  assert isinstance(d, drafters.Hydra)
  a = _run(stories, d)
  b = _run(stories, drafters.Hydra(hydra_heads, k=4))
  assert a.tokens == plain.tokens and a.stats.accepted == b.stats.accepted
  with pytest.raises(ValueError, match="Hydra k=5 needs at least k heads"):
    drafters.Hydra(hydra_heads, k=5)
  with pytest.raises(ValueError, match="expected a 'hydra' head"):
    drafters.Hydra(drafters.MedusaHeads.load(runs / "medusa"))


# ------------------------------------------------------------- a reduced draft vocabulary

V_DRAFT = 96  # of stories260K's 512 tokens


@pytest.fixture(scope="module")
def small_vocab_heads(stories, runs, eagle_head):
  out = {}
  for kind in ("eagle", "medusa"):
    _reuse_data(runs, f"{kind}_v")
    out[kind] = _train(stories, kind, runs / f"{kind}_v", draft_vocab=V_DRAFT)
  return out


def test_draft_vocab_is_the_training_data_s_most_frequent(stories, runs, small_vocab_heads):
  from collections import Counter

  tokens = np.load(runs / "eagle_v" / "data" / "tokens.npy")
  lens = np.load(runs / "eagle_v" / "data" / "lens.npy")
  counts = Counter(t for row, n in zip(tokens, lens) for t in row[:n].tolist())
  top = sorted(counts, key=lambda t: (-counts[t], t))[:V_DRAFT - 1]
  for kind, head in small_vocab_heads.items():
    ids = np.asarray(head.params["vocab_ids"])
    assert head.config.draft_vocab == V_DRAFT and ids.dtype == np.int32
    assert ids.shape == (V_DRAFT,) and list(ids) == sorted(ids)
    assert set(stories.tokenizer.eos_ids) <= set(ids.tolist())
    assert set(top) <= set(ids.tolist()) | set(stories.tokenizer.eos_ids)


def test_draft_vocab_heads_learn_and_are_lossless(stories, plain, runs, small_vocab_heads):
  """Greedy output equals plain decoding for chains and trees; the heads still learn (held-out
  tau rises over training, as with the full vocabulary)."""
  for kind, head in small_vocab_heads.items():
    taus = [h["tau"] for h in _history(runs / f"{kind}_v") if "tau" in h]
    assert taus[-1] > taus[0] + 0.2 and taus[-1] > {"eagle": 1.5, "medusa": 1.2}[kind], taus
    cls = drafters.Eagle if kind == "eagle" else drafters.Medusa
    for d in (cls(head, k=4), cls(head, tree=TREES["dynamic"])):
      out = _run(stories, d)
      assert out.tokens == plain.tokens
      assert out.stats.mean_accepted > 1.1


def test_draft_vocab_head_round_trips(stories, small_vocab_heads, tmp_path):
  import jax.numpy as jnp
  head = small_vocab_heads["medusa"]
  path = head.save(tmp_path / "m")
  back = drafters.MedusaHeads.load(path, dtype=jnp.bfloat16)  # weights cast, ids kept
  assert back.params["vocab_ids"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(back.params["vocab_ids"]),
                                np.asarray(head.params["vocab_ids"]))
  assert back.params["w"].dtype == jnp.bfloat16 and back.config == head.config


def test_draft_vocab_errors(stories, runs):
  with pytest.raises(ValueError, match="draft_vocab must be at most the target's vocabulary"):
    jaxspec.train.train_drafter(stories, kind="eagle", out_dir=str(runs / "x"), steps=1,
                                draft_vocab=513)
  with pytest.raises(ValueError, match="draft_vocab must be None for kind 'distill'"):
    jaxspec.train.train_drafter(stories, kind="distill", out_dir=str(runs / "x"), steps=1,
                                draft_vocab=64)
  with pytest.raises(ValueError, match="draft_vocab must be an integer >= 2"):
    jaxspec.train.train_drafter(stories, kind="eagle", out_dir=str(runs / "x"), steps=1,
                                draft_vocab=1)
  from jaxspec.train import objectives  # the objective factory, called directly
  with pytest.raises(ValueError, match=r"not 'distill' \(a distilled model drafts with "
                                       r"DraftModel\(model, vocab=N\)\)"):
    objectives.make("distill", stories, k=4, ids=range(64))


def test_data_file_formats(stories, tmp_path):
  from jaxspec.train import data
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "Once upon a time"}\n\n{"turns": ["Tom went", "x"]}\n'
                   '{"text": "The cat sat on the mat and"}\n')
  assert [k for k, _ in data.read_prompts(str(jsonl))] == ["chat", "chat", "text"]
  ids = data.encode_prompts(stories, str(jsonl), max_len=4)
  assert len(ids) == 3 and all(1 <= len(x) <= 4 for x in ids)
  txt = tmp_path / "p.txt"
  txt.write_text("Once upon a time\nA dog\n")
  assert data.read_prompts(str(txt)) == [("text", "Once upon a time"), ("text", "A dog")]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": 1}\n')
  with pytest.raises(ValueError, match="'prompt', 'text' or 'turns'"):
    data.read_prompts(str(bad))
  # Batches are a pure function of (seed, step).
  ds = data.Dataset(np.arange(40, dtype=np.int32).reshape(10, 4), np.full(10, 4, np.int32),
                    np.zeros((10, 4, 2), np.float32))
  a, b = ds.batch(0, 5, 4), ds.batch(0, 5, 4)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(ds.batch(0, 6, 4)[0], a[0]) or not np.array_equal(
      ds.batch(1, 5, 4)[0], a[0])
