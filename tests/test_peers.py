"""jaxspec.peers: exporting jaxspec models to transformers (exact logits and greedy tokens, both
RoPE layouts) and `jaxspec bench --compare-transformers` end to end."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxspec  # noqa: E402
from jaxspec import cli, peers  # noqa: E402

from conftest import tiny_model  # noqa: E402


pytestmark = pytest.mark.usefixtures("fast_compile")


CASES = {
    "interleaved-gqa-tied": dict(rope_layout="interleaved"),
    "half-mha-untied": dict(rope_layout="half", n_kv_heads=4, tied_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_jaxspec(case):
  model = tiny_model(seed=1, **CASES[case])
  m = peers.to_transformers(model)
  ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 12)).tolist()
  want = np.asarray(jaxspec.logits(model, ids))
  with torch.inference_mode():
    got = m(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if model.config.rope_layout == "interleaved":  # greedy decoding with caches on both sides
    ok, jx, hf = peers.check_greedy(model, m, ids[0], n=12)
    assert ok and jx[:len(hf)] == hf and len(hf) > 0


def test_rope_permutation_maps_pairs_to_halves():
  perm = peers.rope_permutation(8, "interleaved")
  # rotate-half pairs (i, i + 4) of the permuted vector are the interleaved pairs (2i, 2i + 1)
  assert [(perm[i], perm[i + 4]) for i in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
  assert peers.rope_permutation(8, "half").tolist() == list(range(8))


def test_truncated_assistant(stories):
  small = peers.truncate(stories, 3)
  assert small.config.n_layers == 3 and small.tokenizer is stories.tokenizer
  m = peers.to_transformers(stories, n_layers=3)
  assert m.config.num_hidden_layers == 3
  ids = stories.tokenizer.encode("Once upon a time")
  want = np.asarray(jaxspec.logits(small, [ids]))
  with torch.inference_mode():
    got = m(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="layers"):
    peers.truncate(stories, 5)


def test_compare_transformers_end_to_end(stories):
  """bench's --compare-transformers path on 2 prompts: jaxspec plain, then every peer method."""
  from jaxspec import bench

  a = cli.build_parser().parse_args(
      ["bench", "--compare-transformers", "--max-new-tokens", "6", "--k", "3", "--out", "-"])
  assert a.compare_transformers and a.assistant is None
  (name, d), = peers.jaxspec_methods(stories, a)  # the assistant, run by jaxspec beside
  assert name == "draft (first 3/5 layers) k=3" and d.k == 3
  assert d.draft_model.config.n_layers == 3
  prompts = bench.load_prompts(None, 1, "qa,translation")
  assert len(prompts) == 2
  results = bench.run(stories, prompts, [("plain", None)], max_new_tokens=6, chat=False,
                      progress=False)
  md, hf = peers.compare(stories, a, prompts, results, progress=False)
  assert list(hf) == list(peers.HF_METHODS)
  for res in hf.values():
    assert [r["category"] for r in res["rows"]] == [p["category"] for p in prompts]
    assert all(0 < r["tokens"] <= 6 and r["seconds"] > 0 for r in res["rows"])
  rows = [line for line in md.splitlines() if line.startswith("| ")]
  for name in peers.HF_METHODS + ("jaxspec plain",):
    hits = [r for r in rows if r.startswith(f"| {name} |")]
    assert hits, f"no row for {name}:\n{md}"
    assert hits[0].count("x)") == 3  # translation, qa, overall: tokens/s (ratio)
  # transformers' plain greedy decoding equals jaxspec's on both prompts.
  assert "hf greedy (dynamic cache) 2/2" in md and "hf greedy (static cache) 2/2" in md
  assert hf["hf greedy (dynamic cache)"]["rows"][0]["output"] == results["plain"]["rows"][0][
      "output"]


def test_encode_matches_bench(stories):
  prompts = [{"category": "qa", "text": "Once upon a time"}]
  assert peers.encode(stories, prompts, 8, chat=False) == [stories.tokenizer.encode(
      "Once upon a time")]
  long = [{"category": "qa", "text": "a b " * 600}]
  assert len(peers.encode(stories, long, 12, chat=False)[0]) == stories.config.max_seq_len - 12


def test_export_rejects_unknown_arch():
  model = tiny_model()
  model = dataclasses.replace(model, config=dataclasses.replace(model.config, arch="gpt2"))
  with pytest.raises(ValueError, match="cannot export"):
    peers.to_transformers(model)
