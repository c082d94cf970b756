"""Bad input gets a clear error, never a traceback from deep inside JAX or garbage tokens.

Every row of docs/errors.md names the test that backs it; `test_errors_doc_rows_are_tested`
checks that each named test exists. Rows already covered elsewhere (test_generate,
test_speculative, test_loaders, test_hf, test_checkpoint, test_sharding, test_trees) are not
repeated here.
"""

import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import drafters, trees
from jaxspec.cli import main as cli_main
from jaxspec.models import ByteTokenizer, Model

from conftest import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def tiny():
  return tiny_model(seed=5, max_seq_len=64)


def nan_model(where: str = "all", seed: int = 6, **kw) -> Model:
  m = tiny_model(seed=seed, **kw)
  if where == "all":
    params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), m.params)
  else:  # one token's embedding: rows that read or produce that token go bad
    params = dict(m.params, embed=m.params["embed"].at[int(where)].set(jnp.nan))
  return Model(m.config, params, m.tokenizer, name=f"nan-{where}")


# ----------------------------------------------------------------------------------------------
# generate / stream / logits arguments


@pytest.mark.parametrize("prompts,kwargs,exc,match", [
    ([123], {}, TypeError, "must be a str or a list of token ids"),
    ([[1, -3]], {}, ValueError, "outside the vocabulary"),
    (["hi"], dict(max_new_tokens=2.5), ValueError, "max_new_tokens must be a positive integer"),
    (["hi"], dict(max_new_tokens=-4), ValueError, "max_new_tokens must be a positive integer"),
    (["hi"], dict(temperature=float("inf")), ValueError, "temperature"),
    (["hi"], dict(temperature="hot"), ValueError, "temperature"),
    (["hi"], dict(temperature=1.0, top_k=2.5), ValueError, "top_k"),
    (["hi"], dict(temperature=1.0, top_k=True), ValueError, "top_k"),
    (["hi"], dict(temperature=1.0, top_p="most"), ValueError, "top_p"),
    (["hi"], dict(stop_tokens=list(range(3, 12))), ValueError, "at most 8 stop tokens"),
    (["hi"], dict(stop_tokens=[-1]), ValueError, "stop token"),
    (["a", "b"], dict(stop_tokens=[[2]]), ValueError, "per-row stop_tokens has 1 rows"),
])
def test_bad_generate_arguments(stories, prompts, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jaxspec.generate(stories, prompts, **kwargs)


def test_not_a_model():
  with pytest.raises(TypeError, match="model must be a jaxspec Model"):
    jaxspec.generate("stories260K", ["hi"])


def test_text_prompt_without_tokenizer(tiny):
  bare = Model(tiny.config, tiny.params, None, name="bare")
  with pytest.raises(ValueError, match="has no tokenizer: pass token ids"):
    jaxspec.generate(bare, ["hello"])
  with pytest.raises(ValueError, match="no tokenizer; stream needs one"):
    next(jaxspec.stream(bare, [1, 2, 3]))


def test_stream_arguments(stories):
  with pytest.raises(TypeError, match="single prompt"):
    next(jaxspec.stream(stories, ["a", "b"]))
  with pytest.raises(TypeError, match=r"unexpected keyword arguments: \['max_tokens'\]"):
    next(jaxspec.stream(stories, "a", max_tokens=3))


def test_logits_beyond_context(tiny):
  with pytest.raises(ValueError, match="exceed the model's context of 64"):
    jaxspec.logits(tiny, [[1] * 65])


def test_context_boundary_with_a_drafter(tiny):
  """prompt + max_new_tokens == context is fine even though a round drafts past it (the
  buffer has k slots of slack); one token more is refused up front."""
  prompt = [[1] + [5, 6, 7] * 19]  # 58 tokens
  for d in (drafters.NGram(k=8), drafters.EarlyExit(layers=1, k=8)):
    out = jaxspec.generate(tiny, prompt, drafter=d, max_new_tokens=6, stop_tokens=())
    assert len(out.tokens[0]) == 6
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
      jaxspec.generate(tiny, prompt, drafter=d, max_new_tokens=7)


# ----------------------------------------------------------------------------------------------
# drafters and trees


def test_draft_model_with_a_different_tokenizer(tiny):
  other = tiny_model(seed=7, max_seq_len=64)
  other = Model(other.config, other.params, ByteTokenizer(vocab=64, eos_ids=(3,)), name="other")
  # another tokenizer is translated (tests/test_cross_vocab.py), not refused
  plain = jaxspec.generate(tiny, [[1, 2, 3]], max_new_tokens=4, stop_tokens=())
  out = jaxspec.generate(tiny, [[1, 2, 3]], drafter=drafters.DraftModel(other), max_new_tokens=4,
                         stop_tokens=())
  assert out.tokens == plain.tokens
  with pytest.raises(TypeError, match="DraftModel expects a jaxspec Model"):
    drafters.DraftModel("stories260K")


@pytest.mark.parametrize("make,match", [
    (lambda: drafters.EarlyExit(layers=0), "EarlyExit layers must be a positive integer"),
    (lambda: drafters.NGram(n=0), r"NGram n must be an integer in \[1, 16\]"),
    (lambda: drafters.NGram(n=17), r"NGram n must be an integer in \[1, 16\]"),
    (lambda: drafters.NGram(k=True), "draft length k"),
    (lambda: drafters.EarlyExit(layers=2, tree=1), r"nodes must be in \[2, 256\]"),
    (lambda: drafters.EarlyExit(layers=2, tree=300), r"nodes must be in \[2, 256\]"),
    (lambda: trees.Static(tuple([-1] + [0] * 300)), "at most 256 are supported"),
    (lambda: trees.Static.from_branching([]), "branching must be a non-empty list"),
])
def test_bad_drafter_and_tree_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ----------------------------------------------------------------------------------------------
# NaN / inf logits: an error, not tokens


def test_nan_logits_raise_instead_of_returning_tokens():
  bad = nan_model("all")
  with pytest.raises(FloatingPointError, match=r"non-finite logits .* row\(s\) \[0, 1\]"):
    jaxspec.generate(bad, [[1, 2, 3], [1, 4]], max_new_tokens=4)
  with pytest.raises(FloatingPointError, match="non-finite logits"):
    jaxspec.generate(bad, [[1, 2, 3]], drafter=drafters.NGram(k=2), max_new_tokens=4)
  with pytest.raises(FloatingPointError, match="non-finite logits"):
    list(jaxspec.stream(bad, [1, 2, 3], max_new_tokens=4))


def test_nan_logits_name_the_bad_rows():
  # Token 5's input embedding is NaN (head untied): only the row that reads it goes bad.
  bad = nan_model("5", tied_embeddings=False)
  with pytest.raises(FloatingPointError, match=r"row\(s\) \[1\]"):
    jaxspec.generate(bad, [[1, 2, 3], [1, 5, 6]], max_new_tokens=1)


def test_nan_in_the_draft_model_alone_is_harmless_when_greedy():
  target = tiny_model(seed=8)
  draft = nan_model("all", seed=9)
  plain = jaxspec.generate(target, [[1, 2, 3], [1, 4]], max_new_tokens=8, stop_tokens=())
  out = jaxspec.generate(target, [[1, 2, 3], [1, 4]], drafter=drafters.DraftModel(draft, k=3),
                         max_new_tokens=8, stop_tokens=())
  assert out.tokens == plain.tokens  # the target verifies every token


# ----------------------------------------------------------------------------------------------
# Corrupt and truncated files (the cases test_loaders / test_hf / test_checkpoint leave out)


def test_gguf_garbage_after_magic(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError, match="corrupt or truncated GGUF file"):
    jaxspec.load_model(str(path), progress=False)


def test_llama2c_implausible_header(tmp_path):
  path = tmp_path / "zeros.bin"
  path.write_bytes(bytes(4096))
  with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
    jaxspec.load_model(str(path))


def test_llama2c_nan_weights(tmp_path):
  from jaxspec.models.load import embedded_path
  data = bytearray(open(os.path.join(embedded_path("stories260K"), "stories260K.bin"), "rb").read())
  data[28 + 4 * 100:28 + 4 * 101] = np.float32(np.nan).tobytes()  # one embedding weight
  path = tmp_path / "nan.bin"
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="NaN or infinite weights"):
    jaxspec.load_model(str(path))


@pytest.mark.parametrize("text,match", [("{oops", "config.json: not valid JSON"),
                                        ("", "config.json: not valid JSON"),
                                        ("[1, 2]", "config.json: expected a JSON object")])
def test_hf_config_not_json(tmp_path, text, match):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match=match):
    jaxspec.load_model(str(tmp_path))


def test_hf_empty_safetensors_and_bad_tokenizer(tmp_path):
  from jaxspec.models import hf
  (tmp_path / "config.json").write_text(json.dumps(dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
      intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="truncated safetensors file"):
    jaxspec.load_model(str(tmp_path), progress=False)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json: cannot read tokenizer"):
    hf.load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory):
  return jaxspec.save_checkpoint(tiny_model(seed=10), tmp_path_factory.mktemp("orbax") / "ckpt")


def _damaged_copy(src, dst, damage):
  shutil.copytree(src, dst)
  damage(pathlib.Path(dst) / "params")
  return str(dst)


def _largest_data_file(params: pathlib.Path) -> pathlib.Path:
  return max((p for p in params.rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage,match", [
    (lambda p: os.truncate(_largest_data_file(p), 100), "damaged or truncated Orbax checkpoint"),
    (lambda p: _largest_data_file(p).write_bytes(bytes(_largest_data_file(p).stat().st_size)),
     "damaged or truncated Orbax checkpoint"),
    (lambda p: [f.unlink() for f in p.rglob("*") if f.is_file() and f.parent.name == "d"],
     "damaged"),
    (lambda p: os.truncate(p / "_METADATA", 20), "damaged Orbax checkpoint: its metadata"),
    (lambda p: (p / "_METADATA").unlink(), "damaged Orbax checkpoint: its metadata"),
    (lambda p: os.truncate(p / "manifest.ocdbt", 10), "damaged Orbax checkpoint"),
], ids=["truncated-data", "zeroed-data", "missing-data", "truncated-metadata",
        "missing-metadata", "truncated-manifest"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reader
def test_damaged_orbax_files(orbax_ckpt, tmp_path, damage, match):
  path = _damaged_copy(orbax_ckpt, tmp_path / "ckpt", damage)
  with pytest.raises(ValueError, match=match):
    jaxspec.load_model(path)


# ----------------------------------------------------------------------------------------------
# Meshes


def test_mesh_that_does_not_divide_the_heads(orbax_ckpt):
  import jaxspec.sharding as sh
  mesh = sh.make_mesh(data=1, tensor=8)  # tiny models have 4 query heads
  with pytest.raises(ValueError, match="4 query heads are not divisible by the mesh's tensor"):
    jaxspec.load_model(orbax_ckpt, mesh=mesh)
  three = sh.make_mesh(data=1, tensor=3, devices=jax.devices()[:3])  # stories260K: 8 heads
  with pytest.raises(ValueError, match="8 query heads are not divisible"):
    jaxspec.load_model("stories260K", mesh=three)
  stories = jaxspec.load_model("stories260K")
  with pytest.raises(ValueError, match="8 query heads are not divisible"):
    jaxspec.generate(stories, ["hi"], mesh=three, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------
# The command line: one clean line on stderr, exit status 2


def _cli(argv, capsys):
  rc = cli_main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.mark.parametrize("argv,match", [
    (["generate", "hi", "--model", "/no/such/model.gguf"], "no such model"),
    (["generate", "hi", "--drafter", "early-exit:x"], "early-exit:L needs an integer, got 'x'"),
    (["generate", "hi", "--drafter", "early-exit"], "needs a layer count"),
    (["generate", "hi", "--drafter", "warp:3"], "unknown drafter 'warp:3'"),
    (["generate", "hi", "--drafter", "ngram", "--k", "0"], "draft length k"),
    (["generate", "hi", "--drafter", "early-exit:5"], "fewer layers than the target has"),
    (["generate", "hi", "--drafter", "draft:/no/such/dir"], "no such model"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["generate", "hi", "--max-new-tokens", "1000"], "exceeds the model's context of 512"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--temperature", "1", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--chat"], "--chat needs a chat template, but stories260K is a base model"),
    (["bench", "--prompts", "/no/such/prompts.jsonl"], "prompt file not found"),
])
def test_cli_bad_input_is_one_line(argv, match, capsys):
  rc, out, err = _cli(argv, capsys)
  assert rc == 2
  assert err.startswith("jaxspec: error: ") and err.count("\n") == 1, err
  assert re.search(match, err), err
  assert "Traceback" not in err


def test_cli_bad_files_are_one_line(tmp_path, capsys):
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"GGUF" + bytes(64))
  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_text('{"question": "no turns"}\n')
  for argv, match in [(["generate", "hi", "--model", str(junk)], "GGUF"),
                      (["bench", "--prompts", str(bad_jsonl)], "not a Spec-Bench prompt line")]:
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and match in err, err


def test_cli_nan_model_is_one_line(tmp_path, capsys):
  # NaN weights are refused at load time; finite weights that overflow (attention norms of
  # 1e20: q.k overflows float32) give non-finite logits at generate time. One line either way.
  path = jaxspec.save_checkpoint(nan_model("all", vocab_size=259), tmp_path / "nan")
  rc, _, err = _cli(["generate", "hi", "--model", str(path), "--max-new-tokens", "4",
                     "--no-stream"], capsys)
  assert rc == 2 and err.count("\n") == 1 and "holds NaN or infinite weights" in err, err
  m = tiny_model(seed=6, vocab_size=259)
  layers = dict(m.params["layers"], attn_norm=m.params["layers"]["attn_norm"] * 1e20)
  huge = Model(m.config, dict(m.params, layers=layers), m.tokenizer, name="overflow")
  path = jaxspec.save_checkpoint(huge, tmp_path / "overflow")
  rc, _, err = _cli(["generate", "hi", "--model", str(path), "--max-new-tokens", "4",
                     "--no-stream"], capsys)
  assert rc == 2 and err.count("\n") == 1 and "non-finite logits" in err, err


def test_cli_usage_errors_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli_main(["generate", "--k", "four"])
  assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    cli_main(["fly"])
  assert e.value.code == 2


def _subcommands():
  from jaxspec.cli import build_parser
  import argparse
  p = build_parser()
  sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
  return sorted(sub.choices)


@pytest.mark.parametrize("cmd", [None] + _subcommands())
def test_cli_help_has_examples(cmd, capsys):
  with pytest.raises(SystemExit) as e:
    cli_main(([cmd] if cmd else []) + ["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "examples:" in out
  examples = out.split("examples:", 1)[1]
  assert f"jaxspec {cmd or ''}".strip() in examples


def test_cli_generate_prints_prompt_and_continuation(capsys):
  rc, out, err = _cli(["generate", "Once upon a", "--max-new-tokens", "4", "--no-stream"], capsys)
  assert rc == 0 and out.startswith("Once upon a time") and "tau" in err


# ----------------------------------------------------------------------------------------------
# docs/errors.md: every row is backed by a test that exists


def test_errors_doc_rows_are_tested():
  text = (ROOT / "docs" / "errors.md").read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ") and "`tests/" in line]
  assert len(rows) >= 40
  for row in rows:
    refs = re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", row)
    assert refs, f"row names no test: {row}"
    for file, name in refs:
      src = (TESTS / file).read_text()
      assert re.search(rf"^def {name}\(", src, re.M), f"{file}::{name} missing ({row})"
