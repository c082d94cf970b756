"""Issue 20: argument edges, tiny temperatures, seeds, token-id prompts, tree sizes, NaN weights
at load time, training-run validation and Ctrl-C on the command line.

Each case is a row of docs/errors.md naming its test here.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import sampling, trees, validate

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------------------------
# jaxspec.validate: pure argument checks


@pytest.mark.parametrize("fn,bad,match", [
    (validate.temperature, [True, "0.5", None, -1, float("nan"), float("inf"), [0.5], 1j],
     "temperature must be a finite number >= 0"),
    (validate.top_k, [True, 2.5, "5", 0, -1, np.float32(3)], "top_k must be a positive integer"),
    (validate.top_p, [True, "0.9", 0, 1.5, float("nan"), np.bool_(True)], r"top_p must be in \(0, 1\]"),
    (validate.max_new_tokens, [True, 2.5, "5", 0, -4, None, np.float64(5)],
     "max_new_tokens must be a positive integer"),
    (validate.rounds_per_chunk, [0, -1, 2.5, True, "4", None], "rounds_per_chunk must be a positive"),
    (validate.seed, [1.5, None, "abc", True, -1, 2**32, 2**32 + 1, 2**63, np.float64(3)],
     r"seed must be an integer in \[0, 2\*\*32\)"),
])
def test_validate_scalars_reject_bools_strings_and_out_of_range(fn, bad, match):
  for x in bad:
    with pytest.raises(ValueError, match=match):
      fn(x)


def test_validate_scalars_accept_numpy_numbers():
  assert validate.temperature(np.float32(0.5)) == 0.5 and validate.temperature(np.int64(1)) == 1.0
  assert validate.top_k(np.int64(5)) == 5 and type(validate.top_k(np.int32(5))) is int
  assert validate.top_p(np.float32(0.5)) == 0.5 and validate.top_p(1) == 1.0
  assert validate.max_new_tokens(np.int64(7)) == 7 and validate.rounds_per_chunk(np.uint8(2)) == 2
  assert validate.seed(np.int64(2**32 - 1)) == 2**32 - 1 and validate.seed(0) == 0
  assert validate.top_k(None) is None and validate.top_p(None) is None
  assert validate.top_k(2**63) == 2**31 - 1  # past any vocabulary: keeps every token
  with pytest.raises(ValueError, match="temperature"):
    validate.temperature(10**400)
  with pytest.raises(ValueError, match="top_p"):
    validate.top_p(10**400)


@pytest.mark.parametrize("p,exc,match", [
    ([1.0, 403.9], TypeError, "prompt 0 has a non-integer token id at position 0: 1.0"),
    ([1, "1"], TypeError, "prompt 0 has a non-integer token id at position 1: '1'"),
    ([1, True], TypeError, "position 1: True"),
    ([[1, 2]], TypeError, r"position 0: \[1, 2\]"),
    ([1, np.array(5)], TypeError, "position 1"),
    (np.array(5), TypeError, "got a 0-d numpy array"),
    (np.array([1.0, 2.0]), TypeError, "dtype float64; token ids must be integers"),
    (np.array([True]), TypeError, "dtype bool"),
    (123, TypeError, "must be a str or a list of token ids, got int"),
    (b"hi", TypeError, "got bytes"),
    ("\ud800", ValueError, "prompt 0 is not valid text: '\\\\ud800' at position 0 cannot be encoded"),
])
def test_validate_prompt_kinds(p, exc, match):
  with pytest.raises(exc, match=match):
    validate.prompts([p])


def test_validate_prompts_accept_numpy_ids():
  assert validate.prompts([np.array([1, 2], np.int64), (np.int32(3), 4)]) == [[1, 2], [3, 4]]
  assert validate.prompts(np.array([[1, 2], [3, 4]], np.uint16)) == [[1, 2], [3, 4]]
  assert validate.prompts(["héllo ✓"]) == ["héllo ✓"]
  with pytest.raises(TypeError, match="wrap a single prompt in a list"):
    validate.prompts(np.array([1, 2]))


def test_validate_stop_tokens():
  assert validate.stop_rows(None, 2, 10, default=(2,)) == [[2], [2]]
  assert validate.stop_rows(np.int64(3), 1, 10) == [[3]]
  assert validate.stop_rows(np.array([3, 4]), 1, 10) == [[3, 4]]
  assert validate.stop_rows([[3], (np.int64(4),)], 2, 10) == [[3], [4]]
  for bad, match in [([True], "stop token True"), ([2.0], "stop token 2.0"), (["2"], "stop token"),
                     ([10], "not a token id in"), ("2", "stop_tokens must be None"),
                     (2.5, "stop_tokens must be None")]:
    with pytest.raises(ValueError, match=match):
      validate.stop_rows(bad, 1, 10)


# ----------------------------------------------------------------------------------------------
# Tiny temperatures: greedy, never tokens from an underflowed distribution

TINY = [9e-7, 1e-10, 1e-22, 1e-30, 1e-38, 1e-45, 5e-324, float(np.finfo(np.float32).smallest_subnormal)]


def test_tiny_temperatures_are_greedy(stories):
  greedy = jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=8)
  for t in TINY:
    out = jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=8, temperature=t, seed=3)
    assert out.tokens == greedy.tokens, t
  # Just above the threshold, sampling is so sharp it is greedy here too, and finite.
  for t in (2e-6, 1e-4):
    out = jaxspec.generate(stories, ["Once upon a time"], max_new_tokens=8, temperature=t, seed=3)
    assert out.tokens == greedy.tokens, t


def test_tiny_temperature_sampling_never_overflows():
  """Below the greedy threshold, called directly: the warp shifts by the max before scaling,
  so the compiled sampler draws the argmax instead of token 0 from NaNs."""
  logits = jax.random.normal(jax.random.key(0), (4, 512)) * 20
  draw = jax.jit(sampling.sample, static_argnums=2)
  for mode in (sampling.SamplingMode(greedy=False),
               sampling.SamplingMode(greedy=False, top_k=True, top_p=True)):
    for t in (1e-6, 1e-10, 1e-22, 1e-30, 1e-37):
      sp = sampling.SamplingParams(temperature=jnp.float32(t), top_k=jnp.int32(5),
                                   top_p=jnp.float32(0.9))
      tok, p = draw(jax.random.key(1), logits, mode, sp)
      assert (tok == jnp.argmax(logits, -1)).all() and bool(jnp.isfinite(p).all()), (mode, t)


def test_cli_tiny_temperature_is_greedy(capsys):
  from jaxspec.cli import main
  argv = ["generate", "Once upon a", "--max-new-tokens", "6", "--no-stream"]
  assert main(argv) == 0
  greedy = capsys.readouterr().out
  assert main(argv + ["--temperature", "1e-30"]) == 0
  assert capsys.readouterr().out == greedy


# ----------------------------------------------------------------------------------------------
# Tree sizes: depth and node counts bounded up front (the program grows with both)


@pytest.mark.parametrize("make,match", [
    (lambda: trees.Dynamic(nodes=16, topk=4, depth=10000), "10000 levels deep; at most 64"),
    (lambda: trees.Dynamic(nodes=16, topk=4, depth=200), "200 levels deep; at most 64"),
    (lambda: trees.Dynamic(nodes=16, topk=8, depth=64), r"runs 505 nodes .* at most 256"),
    (lambda: trees.Dynamic(nodes=16, topk=10**6, depth=1), "topk must be below 256"),
    (lambda: trees.Dynamic(nodes=True), "nodes must be a positive integer"),
    (lambda: trees.Static.chains(1, 200), "200 levels deep; at most 64"),
    (lambda: trees.Static.chains(10**9, 2), "nodes; at most 256"),
    (lambda: trees.Static.chains(1.5, 2), "chains needs width >= 1"),
    (lambda: trees.Static.from_branching([1] * 65), "65 levels deep; at most 64"),
    (lambda: trees.Static.from_branching((1000, 1000)), "more than 256 nodes"),
    (lambda: trees.Static.from_branching((2.5,)), "branching must be a non-empty list"),
    (lambda: trees.Static.from_acceptance([0.5], nodes=10**9), r"nodes must be an integer in \[2, 256\]"),
    (lambda: trees.Static.from_acceptance([0.5], nodes=8, max_depth=100), "100 levels deep"),
    (lambda: trees.Static(tuple(range(-1, 65))), "65 levels deep; at most 64"),
    (lambda: trees.Static((-1, 0.5)), "parents must be ints"),
    (lambda: trees.Static(tuple([-1] + [0] * 10**6)), "1000001 nodes; at most 256"),
])
def test_tree_depth_and_size_are_bounded(make, match):
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=match):
    make()
  assert time.perf_counter() - t0 < 2.0  # refused before building anything big


def test_tree_bounds_admit_the_largest_trees():
  assert trees.Static.chains(1, 64).max_depth == 64
  assert trees.Static.chains(4, 63).n_nodes == 253
  assert trees.Dynamic(nodes=256, topk=4, depth=64).n_fed == 253
  assert trees.Dynamic(nodes=np.int64(16), topk=np.int32(4), depth=4) == trees.Dynamic(16, 4, 4)
  assert trees.check_tree(np.int64(16)) == trees.Dynamic(nodes=16)


# ----------------------------------------------------------------------------------------------
# Ctrl-C on the command line: exit 130 and one line, at any moment (import, compile, run)

JAXSPEC = os.path.join(os.path.dirname(sys.executable), "jaxspec")  # the installed console script
GENERATE = ["generate", "Once upon a time", "--drafter", "early-exit:4", "--max-new-tokens", "400",
            "--no-stream"]


def _handles_sigterm(pid: int) -> bool:
  """Whether the process catches SIGTERM yet: jaxspec.interrupt is installed (Python alone
  leaves SIGTERM at its default). Before that, only Python's own start-up runs (~0.1 s)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return True  # no /proc: count from the start
  return bool(caught >> (signal.SIGTERM - 1) & 1)


def _signal_runs(argv, delays, sig=signal.SIGINT, parallel=4, cwd=None, burst=1, finished=None):
  """Starts `jaxspec argv` once per delay (`parallel` at a time) and sends `sig` that long
  after the command took over signals (`burst` times, 3 ms apart: an impatient user); returns
  (delay, returncode, stderr) for the runs still going when the signal was sent. A run with
  `finished` in its stderr had done all its work when the signal landed (its summary was out):
  it counts as ended before the signal, whether the signal then came before the exit (130 and
  the line), in interpreter teardown (where Python restores the default handler: killed by
  the signal) or after it (0)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  out = []
  for start in range(0, len(delays), parallel):
    batch = sorted(delays[start:start + parallel])
    procs = [subprocess.Popen([JAXSPEC, *argv(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, cwd=cwd) for i in range(start, start + len(batch))]
    ready = [None] * len(procs)
    deadline = time.monotonic() + 60
    while None in ready and time.monotonic() < deadline:
      for j, p in enumerate(procs):
        if ready[j] is None and (p.poll() is not None or _handles_sigterm(p.pid)):
          ready[j] = time.monotonic()
      time.sleep(0.002)
    assert None not in ready, "jaxspec did not start within 60 s"
    sent = [False] * len(procs)
    for j in sorted(range(len(procs)), key=lambda j: ready[j] + batch[j]):
      p = procs[j]
      time.sleep(max(0.0, ready[j] + batch[j] - time.monotonic()))
      sent[j] = p.poll() is None
      for _ in range(burst if sent[j] else 0):
        if p.poll() is None:
          p.send_signal(sig)
          time.sleep(0.003)
    for p, d, was_sent in zip(procs, batch, sent):
      try:
        _, err = p.communicate(timeout=90)
      except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"jaxspec {argv(0)} still running 90 s after a signal at {d} s")
      err = err.decode(errors="replace")
      if was_sent and finished and finished in err:
        assert p.returncode in (0, -sig, 128 + sig) and "Traceback" not in err, err[-2000:]
      elif was_sent:
        out.append((d, p.returncode, err))
      else:
        assert p.returncode == 0, err[-2000:]
  return out


def _assert_one_line(runs, code=130, word="interrupted", alone=True):
  assert runs, "every run ended before its signal"
  for d, rc, err in runs:
    assert rc == code, f"signal at {d} s: exit status {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Exception ignored" not in err, (d, err[-3000:])
    assert err.count(f"jaxspec: {word}") == 1, (d, err[-3000:])
    if alone:
      assert err == f"jaxspec: {word}\n", (d, err[-3000:])
    else:  # after progress bars: on a line of its own
      assert err.replace("\r", "\n").splitlines()[-1] == f"jaxspec: {word}", (d, err[-3000:])


def test_cli_ctrl_c_generate_exits_130_with_one_line():
  """Import (0.3-1.5 s), compile (2-9 s, where 2 in 9 runs used to crash with SIGSEGV or
  'pure virtual method called') and, on a fast machine, the run: 16 runs, 4 at a time; two
  SIGTERMs (exit 143, `jaxspec: terminated`) and two bursts of five Ctrl-Cs."""
  delays = [0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.2, 2.6, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 9.0]
  runs = _signal_runs(lambda i: GENERATE, delays, finished=" tokens in ")
  _assert_one_line(runs)
  # import and compile take over 2 s: a signal this early always lands before the output
  assert {d for d, _, _ in runs} >= {d for d in delays if d <= 1.2}, runs
  _assert_one_line(_signal_runs(lambda i: GENERATE, [1.0, 4.0], sig=signal.SIGTERM,
                                finished=" tokens in "), code=143, word="terminated")
  _assert_one_line(_signal_runs(lambda i: GENERATE, [1.0, 4.0], burst=5, finished=" tokens in "))


def test_exit_never_waits_for_a_stuck_exiting_thread():
  """A burst of signals sends several threads into `interrupt.exit_now`; the first one ends
  the process and the others wait for it. Should that first thread never get there (stuck, or
  gone while holding the exit), the others end the process within HANDOVER_S: before, they
  waited forever (a CI run once hung 90 s after a burst of Ctrl-Cs)."""
  code = ("import signal, threading\n"
          "from jaxspec import interrupt\n"
          "t = threading.Thread(target=interrupt._exit_lock.acquire)  # takes the exit, then is gone\n"
          "t.start(); t.join()\n"
          "interrupt._exiting = t.ident\n"
          "interrupt.exit_now(signal.SIGTERM)\n"
          "print('still running')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=60)
  assert p.returncode == 143 and p.stderr == "jaxspec: terminated\n", p
  assert "still running" not in p.stdout


def test_cli_ctrl_c_while_streaming_tokens():
  """Once tokens are printing (the compiled loop is running): the same one line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.Popen([JAXSPEC, "generate", "Once", "--max-new-tokens", "500", "--stream",
                        "--temperature", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
  got = p.stdout.read(len("Once") + 3)  # the prompt, then generated text
  assert got.startswith(b"Once")
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=60)
  if p.returncode != 0:  # (0: the story ended before the signal landed)
    _assert_one_line([(0, p.returncode, err.decode())])


def test_cli_ctrl_c_bench_and_train_drafter(tmp_path):
  bench = ["bench", "--limit", "1", "--max-new-tokens", "32", "--out", str(tmp_path / "b.md")]
  _assert_one_line(_signal_runs(lambda i: bench, [0.5, 3.0, 6.0]), alone=False)
  train = lambda i: ["train-drafter", "--kind", "eagle", "--out", str(tmp_path / f"run{i}"),
                     "--steps", "300", "--num-prompts", "8", "--samples-per-prompt", "1",
                     "--seq-len", "32", "--batch-size", "4", "--eval-every", "0"]
  _assert_one_line(_signal_runs(train, [0.5, 4.0, 9.0]), alone=False)


def test_cli_ctrl_c_in_the_training_loop_saves_first(tmp_path):
  """Once steps run: Ctrl-C stops at the next step, saves a checkpoint, prints the line after
  the progress bar and exits 130."""
  import threading
  out = tmp_path / "run"
  argv = [JAXSPEC, "train-drafter", "--kind", "eagle", "--out", str(out), "--steps", "5000",
          "--num-prompts", "8", "--samples-per-prompt", "1", "--seq-len", "32",
          "--batch-size", "4", "--eval-every", "0"]
  p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  chunks = []
  reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stderr.read1(4096), b"")))
  reader.start()
  deadline = time.monotonic() + 120
  while b"/5000 [" not in b"".join(chunks) or b"loss=" not in b"".join(chunks):
    assert time.monotonic() < deadline and p.poll() is None, b"".join(chunks)[-2000:]
    time.sleep(0.2)
  p.send_signal(signal.SIGINT)
  p.wait(timeout=60)
  reader.join()
  err = b"".join(chunks).decode(errors="replace")
  _assert_one_line([(0, p.returncode, err)], alone=False)
  saved = [int(x) for x in os.listdir(out / "state") if x.isdigit()]
  assert saved and max(saved) >= 1 and (out / "train_config.json").exists(), saved


# ----------------------------------------------------------------------------------------------
# NaN / inf weights: refused at load time for every format, naming the tensor


def _nan_source():
  from test_loaders import _source
  cfg, params = _source(tied=False)
  params["layers"]["w_up"][1, 3, 5] = np.nan  # layer 1's up projection
  return cfg, params


def test_nan_weights_rejected_at_load_gguf(tmp_path):
  from gguf import GGMLQuantizationType as Q
  from test_loaders import write_gguf
  cfg, params = _nan_source()
  write_gguf(tmp_path / "nan.gguf", cfg, params, qtype=lambda name: Q.F32)
  with pytest.raises(ValueError, match=r"nan.gguf: tensor 'blk.1.ffn_up.weight' holds NaN or "
                                       r"infinite weights \(1 of 2048 values"):
    jaxspec.load_model(str(tmp_path / "nan.gguf"), progress=False)
  cfg, params = _nan_source()
  params["layers"]["w_up"][1, 3, 5] = 0.0
  params["embed"][7, 1] = np.inf  # stored as F16
  write_gguf(tmp_path / "inf.gguf", cfg, params,
             qtype=lambda name: Q.F16 if name.startswith("token_embd") else Q.F32)
  with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' holds NaN or infinite .* "
                                       r"first at index \(7, 1\)"):
    jaxspec.load_model(str(tmp_path / "inf.gguf"), progress=False)


def test_nan_weights_rejected_at_load_hf(tmp_path):
  from safetensors.numpy import save_file
  from jaxspec.models.hf_names import state_dict
  cfg, params = _nan_source()
  (tmp_path / "config.json").write_text(json.dumps(dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
      hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      tie_word_embeddings=False, torch_dtype="float32")))
  sd = state_dict(cfg, params)
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj"
                                       r".weight' holds NaN or infinite weights"):
    jaxspec.load_model(str(tmp_path), progress=False)


def test_nan_weights_rejected_at_load_orbax_and_llama2c(tmp_path):
  m = tiny_model(seed=3)
  layers = dict(m.params["layers"], w_down=m.params["layers"]["w_down"].at[0, 2, 2].set(jnp.inf))
  bad = jaxspec.Model(m.config, dict(m.params, layers=layers), m.tokenizer, name="inf")
  path = jaxspec.save_checkpoint(bad, tmp_path / "orbax")
  with pytest.raises(ValueError, match=r"params: tensor 'layers/w_down' holds NaN or infinite "
                                       r"weights \(1 of \d+ values, the first at index \(0, 2, 2\)"):
    jaxspec.load_model(path)
  from jaxspec.models.load import embedded_path
  data = bytearray(open(os.path.join(embedded_path("stories260K"), "stories260K.bin"), "rb").read())
  data[28 + 4 * 100:28 + 4 * 101] = np.float32(np.nan).tobytes()  # one embedding weight
  (tmp_path / "nan.bin").write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"nan.bin: tensor 'embed' holds NaN .* index \(1, 36\)"):
    jaxspec.load_model(str(tmp_path / "nan.bin"))


# ----------------------------------------------------------------------------------------------
# train-drafter: everything validated before any work, nothing written for a run that never
# started, command-line wording, "resuming from step N"


@pytest.mark.parametrize("kw,match", [
    (dict(kind="medusa", k=0), r"k must be an integer in \[1, 64\], got 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(lr=0), "lr must be a finite number > 0"),
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(seq_len=1), "seq_len must be an integer >= 2"),
    (dict(seq_len=10**6), "exceeds the model's context"),
    (dict(seed=2**40), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(eval_every=-1), "eval_every must be an integer >= 0 or None"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(clip=float("inf")), "clip must be a finite number > 0"),
    (dict(num_prompts=0), "num_prompts must be a positive integer or None"),
    (dict(kind="lookahead"), "unknown drafter kind"),
    (dict(data="/no/such/prompts.jsonl"), "training data file not found"),
    (dict(resume="yes"), "resume must be True or False"),
])
def test_train_drafter_validates_before_any_work(stories, tmp_path, kw, match):
  out = tmp_path / "run"
  t0 = time.perf_counter()
  with pytest.raises((ValueError, OSError), match=match):
    jaxspec.train.train_drafter(stories, **{"kind": "eagle", "out_dir": str(out), "steps": 5,
                                            **kw})
  assert time.perf_counter() - t0 < 5  # no data generation, no compile
  assert not out.exists()  # nothing recorded for a run that never started


def test_cli_train_drafter_names_flags_and_writes_nothing(tmp_path, capsys):
  from jaxspec.cli import main
  out = tmp_path / "run"
  for argv, match in [(["--kind", "medusa", "--k", "0"], "--k must be an integer in [1, 64]"),
                      (["--kind", "eagle", "--lr", "nan"], "--lr must be a finite number > 0"),
                      (["--kind", "eagle", "--batch-size", "0"], "--batch-size must be a positive"),
                      (["--kind", "eagle", "--data", "/nonexistent.jsonl"], "not found"),
                      (["--kind", "eagle", "--mesh", "3x3"],
                       "--mesh 3x3: data=3 x tensor=3 = 9 devices, but 8 are available"),
                      (["--kind", "eagle", "--mesh", "two"], "--mesh must be DATAxTENSOR"),
                      (["--kind", "eagle", "--mesh", "8x1", "--batch-size", "12"],
                       "--batch-size 12 does not split over --mesh's 8 data shards")]:
    assert main(["train-drafter", "--out", str(out), "--steps", "5", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxspec: error: ") and err.count("\n") == 1 and match in err, err
    assert not out.exists()
  # A directory holding another run: the advice names the flags, not the Python arguments.
  out.mkdir()
  (out / "train_config.json").write_text(json.dumps({"kind": "eagle", "lr": 1.0}))
  assert main(["train-drafter", "--out", str(out), "--kind", "eagle", "--steps", "5"]) == 2
  err = capsys.readouterr().err
  assert "--no-resume" in err and "--lr" in err and "new --out" in err, err
  assert "resume=False" not in err and "out_dir" not in err, err


def test_train_drafter_says_it_resumes(stories, tmp_path, capsys):
  kw = dict(kind="eagle", out_dir=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=16,
            num_prompts=4, samples_per_prompt=1, eval_prompts=0, progress=True)
  jaxspec.train.train_drafter(stories, **kw)
  assert "resuming" not in capsys.readouterr().err
  jaxspec.train.train_drafter(stories, **kw)
  assert "resuming from step 2\n" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# generate / stream: the checks wired in (bools, strings, numpy scalars, seeds, prompts)


@pytest.fixture(scope="module")
def byte_tiny():
  from jaxspec.models import ByteTokenizer, Model
  m = tiny_model(seed=4, vocab_size=259, max_seq_len=256)
  return Model(m.config, m.params, ByteTokenizer(), name="bytes")


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=True), "temperature must be a finite number >= 0, got True"),
    (dict(temperature="0.5"), r"temperature must be a finite number >= 0, got '0.5' \(str\)"),
    (dict(temperature=1.0, top_p=True), r"top_p must be in \(0, 1\], got True"),
    (dict(temperature=1.0, top_k=True), "top_k must be a positive integer or None, got True"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(stop_tokens=[True]), "stop token True"),
    (dict(stop_tokens="2"), "stop_tokens must be None"),
    (dict(seed=True), r"seed must be an integer in \[0, 2\*\*32\), got True"),
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
    (dict(seed=2**63), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=None), "seed must be an integer"),
    (dict(seed="abc"), "seed must be an integer"),
])
def test_generate_rejects_bools_strings_and_bad_seeds_by_name(byte_tiny, kw, match):
  with pytest.raises(ValueError, match=match):
    jaxspec.generate(byte_tiny, [[1, 5, 6]], **kw)
  with pytest.raises(ValueError, match=match):
    next(jaxspec.stream(byte_tiny, [1, 5, 6], **kw))


def test_generate_accepts_numpy_scalars(byte_tiny):
  py = jaxspec.generate(byte_tiny, [[1, 5, 6]], max_new_tokens=5, temperature=0.9, top_k=5,
                        top_p=0.9, seed=7, stop_tokens=[2])
  np_ = jaxspec.generate(byte_tiny, [np.array([1, 5, 6], np.int64)], max_new_tokens=np.int64(5),
                         temperature=np.float32(0.9), top_k=np.int64(5),
                         top_p=np.float64(0.9), seed=np.uint32(7), stop_tokens=np.array([2]))
  assert np_.tokens == py.tokens
  two_d = jaxspec.generate(byte_tiny, np.array([[1, 5, 6]], np.int32), max_new_tokens=5,
                           temperature=0.9, top_k=5, top_p=0.9, seed=7, stop_tokens=[2])
  assert two_d.tokens == py.tokens
  assert "".join(jaxspec.stream(byte_tiny, np.array([1, 5, 6]), max_new_tokens=np.int64(3),
                                rounds_per_chunk=np.int64(2)))


def test_seeds_are_distinct_over_the_documented_range(byte_tiny):
  """Seeds that used to collide (2**32 with 0, -1 with 2**32-1) are refused; the top of the
  range is its own stream."""
  kw = dict(max_new_tokens=12, temperature=1.5, stop_tokens=())
  streams = {s: jaxspec.generate(byte_tiny, [[1, 5]], seed=s, **kw).tokens[0]
             for s in (0, 1, 2**31, 2**32 - 1)}
  assert len({tuple(v) for v in streams.values()}) == 4
  for s in (2**32, 2**32 + 1, -1):
    with pytest.raises(ValueError, match="seed must be an integer"):
      jaxspec.generate(byte_tiny, [[1, 5]], seed=s, **kw)


@pytest.mark.parametrize("prompts,exc,match", [
    ([[1.0, 403.9]], TypeError, "prompt 0 has a non-integer token id at position 0: 1.0"),
    ([[1, "1"]], TypeError, "prompt 0 has a non-integer token id at position 1"),
    ([[1, True]], TypeError, "prompt 0 has a non-integer token id at position 1: True"),
    ([[[1, 2]]], TypeError, r"prompt 0 has a non-integer token id at position 0: \[1, 2\]"),
    ([np.array(5)], TypeError, "prompt 0 must be a str or a list of token ids, got a 0-d"),
    ([[1, 2], np.array([1.5])], TypeError, "prompt 1 has token ids of dtype float64"),
    (["ok", "\ud800"], ValueError, "prompt 1 is not valid text"),
])
def test_generate_prompt_kinds(byte_tiny, prompts, exc, match):
  with pytest.raises(exc, match=match):
    jaxspec.generate(byte_tiny, prompts, max_new_tokens=2)


def test_stream_rounds_per_chunk_must_be_positive(byte_tiny):
  for bad in (0, -1, 2.5, True, "4", None):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="rounds_per_chunk must be a positive integer"):
      list(jaxspec.stream(byte_tiny, [1, 5, 6], max_new_tokens=5, rounds_per_chunk=bad))
    assert time.perf_counter() - t0 < 30  # refused up front (0 used to loop forever)
  with pytest.raises(ValueError, match="prompt 0 is not valid text"):
    next(jaxspec.stream(byte_tiny, "\ud800"))


def test_cli_out_of_range_seed_is_one_line(capsys):
  from jaxspec.cli import main
  for seed in (str(2**63), str(2**32), "-1"):
    assert main(["generate", "hi", "--seed", seed, "--max-new-tokens", "2", "--no-stream"]) == 2
    err = capsys.readouterr().err
    assert err == f"jaxspec: error: seed must be an integer in [0, 2**32), got {seed}\n", err


@pytest.mark.parametrize("args, match", [
    (["--drafter", "ngram", "--tree", "-3"], "--tree must be a node budget of at least 2 .* got -3"),
    (["--drafter", "ngram", "--tree", "0"], "--tree must be a node budget of at least 2 .* got 0"),
    (["--drafter", "ngram", "--tree", "1"], "--tree must be a node budget of at least 2 .* got 1"),
    (["--drafter", "ngram", "--tree", "3"], "--tree 3: it holds no chain of --k 4 drafts"),
    (["--drafter", "ngram", "--tree", "300"], "--tree 300: .* 297 nodes; at most 256"),
    (["--tree", "8"], "--tree 8 has no effect without a drafter"),
    (["--drafter", "recycling", "--k", "9"], "--k has no effect with --drafter recycling"),
])
def test_cli_tree_and_k_say_when_they_cannot_apply(capsys, args, match):
  """Bad node budgets, a budget too small for one chain, and options with no effect are one
  line naming the user's own value (they used to build the same 5-node chain silently)."""
  import re
  from jaxspec.cli import main
  assert main(["generate", "hi", "--max-new-tokens", "2", "--no-stream", *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxspec: error: ") and err.count("\n") == 1, err
  assert re.search(match, err), err


def test_cli_tree_budgets_that_fit_are_used(capsys):
  """--tree 9 with --k 4 is two chains of 4 (9 nodes); recycling takes --tree without --k."""
  from jaxspec.drafters import registry
  assert registry.parse("ngram", None, 9).tree.n_nodes == 9
  assert registry.parse("ngram", 2, 9).tree.n_nodes == 9  # four chains of 2
  assert registry.parse("recycling", None, 16).tree.n_nodes <= 16
  assert registry.parse("none") is None
