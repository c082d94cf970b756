"""Continuous batching (`generate_many`) and `jaxspec run` over JSONL (resume, many hosts)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import jaxspec
from conftest import truncated
from jaxspec import cli, drafters, engine, trees
from jaxspec.batching import generate_many

pytestmark = pytest.mark.usefixtures("fast_compile")

BASES = ["Once upon a time", "Tom and his dog went to the", "The little bird", "Lily wanted to",
         "One day, a big bear", "The sun was hot and", "Sam had a red ball. He",
         "Mom said"]
# 40 prompts of 2 .. 40 tokens; rows stop at the first "," (432) or run to max_new_tokens.
PROMPTS = [BASES[i % 8] + " and the cat" * (i // 5) for i in range(40)]
STOP = (2, 432)
N_NEW = 24
MAXP = 48  # max_prompt_tokens: every greedy run shares one plan (and its programs)


def drafter_for(kind, model):
  if kind == "chain":
    return drafters.EarlyExit(layers=3, k=3)
  if kind == "tree":
    return drafters.DraftModel(truncated(model, 2), tree=trees.Static.from_branching((2, 2)))
  return None


@pytest.fixture(scope="module")
def plain(stories):
  """Per-prompt greedy `generate` (the reference every slot must match)."""
  return [jaxspec.generate(stories, [p], max_new_tokens=N_NEW, stop_tokens=STOP).tokens[0]
          for p in PROMPTS]


@pytest.mark.parametrize("kind", ["none", "chain", "tree"])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_greedy_equals_generate(stories, plain, batch_size, kind):
  # Every round speculative, so the drafters' rounds are what is compared (with the default
  # switch a drafter that does not pay at this batch would decode plainly)
  out = list(generate_many(stories, PROMPTS, batch_size=batch_size,
                           drafter=drafter_for(kind, stories), max_new_tokens=N_NEW,
                           stop_tokens=STOP, max_prompt_tokens=MAXP,
                           speculate=None if kind == "none" else "always"))
  assert sorted(c.index for c in out) == list(range(len(PROMPTS)))
  by = {c.index: c for c in out}
  for i, want in enumerate(plain):
    assert by[i].tokens == want, (i, batch_size, kind)
    assert by[i].finish_reason == ("stop" if want[-1] in STOP else "length")
  assert {c.finish_reason for c in out} == {"stop", "length"}  # both kinds of ending
  if kind != "none":
    assert sum(c.new_tokens for c in out) > sum(c.target_calls for c in out)  # tau > 1


def test_switch_ratio_is_measured_at_the_serving_batch(stories, plain, monkeypatch):
  """With the default switch, generate_many times the speculation switch's two round kinds at
  its own batch (every slot busy) before serving, and the loop acts on that ratio: at a ratio
  no drafter can beat, every round is plain (one target call per token) and the output is
  still exact."""
  from jaxspec import policy
  seen = []

  def measure(model, drafter, plan, **kw):
    seen.append((plan.spec.batch, plan.spec.switch, int(plan.inputs.stop.max())))
    return policy.Measured(ratio=1e6, plain_round_s=1e-3, spec_round_s=1e3, seconds=0.0)

  monkeypatch.setattr(policy, "measure", measure)
  out = list(generate_many(stories, PROMPTS[:8], batch_size=4,
                           drafter=drafters.EarlyExit(layers=3, k=3), max_new_tokens=N_NEW,
                           stop_tokens=STOP, max_prompt_tokens=MAXP, speculate="auto"))
  assert seen == [(4, True, -1)]  # 4 slots, stops off while timing
  assert all(c.target_calls == c.new_tokens for c in out)
  assert {c.index: c.tokens for c in out} == dict(enumerate(plain[:8]))
  # Sampled runs speculate every round: nothing to measure
  seen.clear()
  list(generate_many(stories, PROMPTS[:4], batch_size=4, drafter=drafters.EarlyExit(3, k=3),
                     max_new_tokens=4, temperature=1.0, max_prompt_tokens=MAXP,
                     speculate="auto"))
  assert seen == []


def test_no_recompile_after_warmup(stories):
  kw = dict(batch_size=4, max_new_tokens=N_NEW, stop_tokens=STOP, max_prompt_tokens=MAXP)
  list(generate_many(stories, PROMPTS, **kw))  # warm-up: every prompt bucket (16, 32, 64)
  before = engine.compile_count
  others = [p + " and a dog" for p in reversed(PROMPTS[10:30])]
  out = list(generate_many(stories, others, **kw))
  assert len(out) == 20 and engine.compile_count == before


def test_sampled_depends_only_on_seed_and_id(stories):
  items = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS[:12])]
  kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, stop_tokens=STOP,
            drafter=drafters.NGram(k=3), max_prompt_tokens=MAXP)
  a = {c.id: c.tokens for c in generate_many(stories, items, batch_size=2, **kw)}
  shuffled = items[:]
  random.Random(0).shuffle(shuffled)
  b = {c.id: c.tokens for c in generate_many(stories, iter(shuffled), batch_size=8, **kw)}
  assert a == b
  c = {c.id: c.tokens for c in generate_many(stories, items, batch_size=8,
                                             **dict(kw, seed=8))}
  assert c != a
  # Integer ids are the row index of `generate` (speculating every round, as sampled
  # generate_many does): the same draws.
  kw.pop("max_prompt_tokens")
  g = jaxspec.generate(stories, PROMPTS[:4], **kw, speculate="always").tokens
  m = {c.id: c.tokens for c in generate_many(stories, PROMPTS[:4], batch_size=2, **kw,
                                             max_prompt_tokens=MAXP)}
  assert [m[i] for i in range(4)] == g


def test_mesh_equals_single_device(stories, plain):
  """Slots over a 2 x 4 mesh: rows (and inserts) over "data", heads over "tensor"."""
  from jaxspec import sharding
  mesh = sharding.make_mesh(data=2, tensor=4)
  out = {c.index: c.tokens for c in generate_many(
      stories, PROMPTS[:6], batch_size=4, drafter=drafter_for("chain", stories),
      max_new_tokens=N_NEW, stop_tokens=STOP, mesh=mesh)}
  assert [out[i] for i in range(6)] == plain[:6]


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "empty"),
    ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], {}, "appears twice"),
    (["Once upon a time " * 8], dict(max_prompt_tokens=8), "max_prompt_tokens"),
    (["Once " * 200], dict(max_new_tokens=400), "context"),
    ([{"id": 1}], {}, "'prompt' or 'messages'"),
    (["a"], dict(batch_size=0), "batch_size"),
])
def test_generate_many_errors(stories, prompts, kw, match):
  with pytest.raises(ValueError, match=match):
    list(generate_many(stories, prompts, **kw))


# ------------------------------------------------------------------------------ jaxspec run

RUN_ARGS = ["--batch-size", "2", "--insert-size", "1", "--max-new-tokens", "32",
            "--no-progress"]


def _write_input(path, n=40):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"id": f"s{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " ."[:i % 2]})
              + "\n")
  return path


def _read(path):
  with open(path) as f:
    return [json.loads(x) for x in f]


def _run(*args):  # in this process (8 simulated devices): one of them
  return cli.main(["run", *args, "--local-devices", "1"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("ref")
  inp = _write_input(d / "in.jsonl")
  assert _run("--input", str(inp), "--output", str(d / "out.jsonl"), *RUN_ARGS) == 0
  rows = _read(d / "out.jsonl")
  assert sorted(r["id"] for r in rows) == sorted(f"s{i}" for i in range(40))
  return {r["id"]: r["text"] for r in rows}


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return env


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_killed_resumes(tmp_path, reference, sig):
  inp, out = _write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "jaxspec.cli", "run", "--input", str(inp), "--output", str(out),
         *RUN_ARGS]
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if out.exists() and out.read_bytes().count(b"\n") >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  assert proc.wait() in (-signal.SIGKILL, 128 + signal.SIGTERM)
  written = out.read_bytes().count(b"\n")
  assert 3 <= written < 40, written  # killed in the middle
  with open(out, "ab") as f:  # and as if the kill had cut a line short
    f.write(b'{"id": "s39", "text": "half a li')
  assert _run("--input", str(inp), "--output", str(out), *RUN_ARGS) == 0
  rows = _read(out)
  assert sorted(r["id"] for r in rows) == sorted(reference)  # each id exactly once
  assert {r["id"]: r["text"] for r in rows} == reference
  assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
  assert all(r["new_tokens"] == len(r["tokens"]) and r["tau"] >= 1.0 for r in rows)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_run_two_processes_split_the_input(tmp_path, reference):
  inp, out = _write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in range(2):
    env = dict(_env(), JAXSPEC_COORDINATOR=coordinator, JAXSPEC_NUM_PROCESSES="2",
               JAXSPEC_PROCESS_ID=str(i),  # 2 devices each: rows over a local 2-device mesh
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jaxspec.cli", "run", "--input", str(inp), "--output", str(out),
         *RUN_ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  rows = _read(out)
  assert sorted(r["id"] for r in rows) == sorted(reference)  # every id once
  assert {r["id"]: r["text"] for r in rows} == reference
  assert not list(tmp_path.glob("out.jsonl.part-*"))  # merged into the output


def _error(capsys, *args):
  assert _run(*args) == 2
  return capsys.readouterr().err


def test_run_bad_input(tmp_path, capsys, monkeypatch, stories):
  out = str(tmp_path / "out.jsonl")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  assert "has no prompts" in _error(capsys, "--input", str(empty), "--output", out, *RUN_ARGS)
  rep = tmp_path / "rep.jsonl"
  rep.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n')
  assert "rep.jsonl:3: id 1 repeats line 1" in _error(capsys, "--input", str(rep), "--output",
                                                      out, *RUN_ARGS)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1, "prompt": "Once"}\n{"id": 2, "prompt": "Tom\n{"id": 3}\n'
                 '{"id": 4, "prompt": "The little bird"}\n')
  err = _error(capsys, "--input", str(bad), "--output", out, *RUN_ARGS)
  assert "bad.jsonl:2: not valid JSON" in err and "--skip-bad-lines" in err
  assert _run("--input", str(bad), "--output", out, *RUN_ARGS, "--skip-bad-lines") == 0
  err = capsys.readouterr().err
  assert "bad.jsonl:2" in err and "bad.jsonl:3: no 'prompt' or 'messages'" in err
  assert sorted(r["id"] for r in _read(out)) == [1, 4]
  err = _error(capsys, "--input", str(bad), "--output", out, *RUN_ARGS, "--skip-bad-lines",
               "--seed", "5")
  assert "other settings: --seed 0 (now 5)" in err
  # Another model under the same --model name (a re-exported or fine-tuned checkpoint at the
  # same path): its weights differ, so the rerun refuses to mix its lines in.
  monkeypatch.setattr(jaxspec, "load_model", lambda *args, **kw: truncated(stories, 2))
  err = _error(capsys, "--input", str(bad), "--output", out, *RUN_ARGS, "--skip-bad-lines")
  assert "other settings: --model (its weights)" in err
  monkeypatch.undo()
  foreign = tmp_path / "foreign.jsonl"
  foreign.write_text('{"some": "thing"}\n')
  assert "foreign.jsonl:1 is not a jaxspec run output line" in _error(
      capsys, "--input", str(bad), "--output", str(foreign), *RUN_ARGS, "--skip-bad-lines")
  assert "--output" in _error(capsys, "--input", str(bad), "--output", str(tmp_path),
                              *RUN_ARGS)  # a directory
  assert "does not exist" in _error(capsys, "--input", str(bad), "--output",
                                    str(tmp_path / "no" / "out.jsonl"), *RUN_ARGS)
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"id": 1, "prompt": "Once upon a time " * 150}) + "\n")
  assert "long.jsonl:1: prompt of" in _error(capsys, "--input", str(long), "--output",
                                             str(tmp_path / "o2.jsonl"), *RUN_ARGS)
  assert "not found" in _error(capsys, "--input", str(tmp_path / "missing.jsonl"), "--output",
                               out, *RUN_ARGS)
