"""Hugging Face transformers side by side with jaxspec (`jaxspec bench --compare-transformers`).

The same model, the same token ids, the same machine and the same `max_new_tokens`, in the same
process: transformers' plain greedy decoding (static KV cache where `generate` supports it, and
the default dynamic cache), prompt lookup decoding (`prompt_lookup_num_tokens`) and assisted
generation (an assistant model with the same tokenizer), timed per prompt after a warm-up, batch
1, greedy, under `torch.inference_mode`.

The model must exist in transformers form:

- a Hugging Face checkpoint directory is loaded directly (`AutoModelForCausalLM.from_pretrained`);
- anything else jaxspec loads (GGUF, llama2.c .bin, the embedded stories260K, Orbax) is
  exported from jaxspec's own params to a transformers `LlamaForCausalLM` (Qwen2/Qwen3 classes
  for those architectures) in memory by `to_transformers`. GGUF and llama2.c weights rotate
  interleaved RoPE pairs (2i, 2i+1); transformers rotates halves (i, i + H/2), so the export
  permutes the q/k output columns of every head (even indices first, then odd), which maps one
  convention onto the other exactly (q.k is unchanged by a shared permutation).

Before anything is timed, `check_greedy` runs both on a prompt and requires identical greedy
tokens; the report also states how many prompts gave identical outputs.

The assistant for assisted generation is a truncated copy of the target (its first L layers,
then the final norm and head; L defaults to 3/4 of the depth) unless `--assistant SRC` names
another model with the same tokenizer. jaxspec runs the very same truncated model as a
`DraftModel` next to it, so the two engines are compared on identical drafts.
"""

from __future__ import annotations

import os

import argparse
import contextlib
import dataclasses
import time
import warnings

import numpy as np

from jaxspec.models import hf_names
from jaxspec.models.hf_config import to_hf_config
from jaxspec.models.hf_names import rope_permutation  # noqa: F401 (part of peers' surface)

HF_METHODS = ("hf greedy (static cache)", "hf greedy (dynamic cache)", "hf prompt lookup",
              "hf assisted")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--compare-transformers", action="store_true",
                 help="also run Hugging Face transformers (torch) on the same model and prompts: "
                      "greedy, prompt lookup and assisted generation")
  p.add_argument("--assistant", default=None,
                 help="assistant model for transformers' assisted generation (and jaxspec's "
                      "draft:SRC beside it); default: the target's first 3/4 of layers")
  p.add_argument("--assistant-layers", type=int, default=None,
                 help="layers of the truncated-target assistant (default 3/4 of the depth)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch intra-op threads for the transformers runs (default: torch's "
                      "own; 1 is much faster for small models on a busy CPU)")


# ------------------------------------------------------------------------------------- models


def truncate(model, layers: int):
  """A separate `Model`: the target's first `layers` layers, its final norm and head."""
  from jaxspec.models import Model, layout

  if not 1 <= layers < model.config.n_layers:
    raise ValueError(f"a truncated assistant needs 1 <= layers < {model.config.n_layers}, got "
                     f"{layers}")
  cfg = dataclasses.replace(model.config, n_layers=layers)
  params = layout.first_layers(model.params, layers)
  return Model(cfg, params, model.tokenizer, name=f"{model.name}[:{layers}]")


def default_assistant_layers(n_layers: int) -> int:
  return max(1, min(n_layers - 1, (3 * n_layers) // 4))


def hf_state_dict(model) -> dict:
  """jaxspec params -> {transformers name: numpy array} (rotate-half q/k layout)."""
  return hf_names.state_dict(model.config, model.params)


def to_transformers(model, *, n_layers: int | None = None, dtype=None):
  """Exports a jaxspec `Model` (optionally only its first `n_layers` layers) to an in-memory
  transformers causal LM with identical logits. dtype: a torch dtype (default: float32 for
  float32 params, bfloat16 for bfloat16/float16 params)."""
  import torch
  import transformers

  if n_layers is not None and n_layers != model.config.n_layers:
    model = truncate(model, n_layers)
  c = model.config
  cfg_name, cls_name, kw = to_hf_config(c)
  if dtype is None:
    dtype = torch.float32 if str(model.dtype) == "float32" else torch.bfloat16
  tok = model.tokenizer
  eos = [int(e) for e in tok.eos_ids] if tok is not None and tok.eos_ids else None
  bos = getattr(tok, "bos_id", None)
  kw.update(bos_token_id=None if bos is None else int(bos), eos_token_id=eos,
            pad_token_id=eos[0] if eos else 0)
  hf_cfg = getattr(transformers, cfg_name)(**kw)
  with _quiet():
    m = getattr(transformers, cls_name)(hf_cfg)
  sd = {k: torch.tensor(np.ascontiguousarray(v)) for k, v in hf_state_dict(model).items()}
  missing, unexpected = m.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not (c.tied_embeddings and k == "lm_head.weight")]
  if missing or unexpected:
    raise ValueError(f"export to {cls_name} failed: missing {missing[:5]}, unexpected "
                     f"{unexpected[:5]}")
  if c.tied_embeddings:
    m.tie_weights()
  m = m.to(device=_default_device(), dtype=dtype).eval()
  _greedy_generation_config(m, eos)
  return m


def _default_device():
  """The accelerator torch sees (CUDA), else the CPU: the same hardware as jaxspec."""
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def _greedy_generation_config(m, eos) -> None:
  g = m.generation_config
  g.do_sample = False
  g.temperature = g.top_p = g.top_k = None
  if eos is not None:
    g.eos_token_id = eos
    g.pad_token_id = eos[0]
  elif g.pad_token_id is None:
    g.pad_token_id = g.eos_token_id[0] if isinstance(g.eos_token_id, list) else g.eos_token_id


def load_transformers(source: str, model=None, *, n_layers: int | None = None):
  """A transformers model for `source`: loaded directly from a Hugging Face directory, or
  exported from the jaxspec `model` (loaded from `source` when not given)."""
  import jaxspec
  from jaxspec import fetch
  from jaxspec.models.load import detect_format

  source = fetch.resolve(source)
  fmt = detect_format(source)
  if fmt == "hf" and n_layers is None:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(model))
    m = m.to(_default_device()).eval()
    tok = model.tokenizer if model is not None else None
    _greedy_generation_config(m, list(tok.eos_ids) if tok is not None and tok.eos_ids
                              else None)
    return m
  if model is None:
    model = jaxspec.load_model(source, progress=False)
  return to_transformers(model, n_layers=n_layers)


def _torch_dtype(model):
  import torch

  if model is None:
    return torch.float32
  return {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}.get(str(model.dtype), torch.float32)


@contextlib.contextmanager
def _quiet():
  from transformers.utils import logging as hf_logging

  old = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    hf_logging.set_verbosity(old)


# ---------------------------------------------------------------------------------- generation


def _device(m):
  return next(m.parameters()).device


def _sync(m) -> None:
  import torch

  if _device(m).type == "cuda":
    torch.cuda.synchronize()


class _CallCounter:
  """Counts forward calls of a module (target forwards: prefill + one per step/round)."""

  def __init__(self, m):
    self.n = 0
    self.handle = m.register_forward_hook(self._hook)

  def _hook(self, *_):
    self.n += 1

  def remove(self):
    self.handle.remove()


@dataclasses.dataclass
class Method:
  name: str
  kwargs: dict
  count_calls: bool = True  # a forward hook (off where generate may torch.compile the forward)
  static_len: int | None = None  # one StaticCache of this many slots, reset and reused per call
  _cache: object = None

  def call_kwargs(self, m) -> dict:
    if self.static_len is None:
      return self.kwargs
    if self._cache is None:
      try:
        from transformers import StaticCache

        self._cache = StaticCache(config=m.config, max_cache_len=self.static_len)
      except Exception:  # an older or newer signature: let generate build one per call
        self.static_len = None
        return self.kwargs
    else:
      self._cache.reset()
    # A fixed-size cache keeps one shape for every prompt (no torch.compile per prompt length).
    return {**{k: v for k, v in self.kwargs.items() if k != "cache_implementation"},
            "past_key_values": self._cache}


def hf_methods(k: int, assistant=None, static_cache: bool = True,
               static_len: int | None = None) -> list[Method]:
  out = []
  if static_cache:
    out.append(Method(HF_METHODS[0], {"cache_implementation": "static"}, count_calls=False,
                      static_len=static_len))
  out.append(Method(HF_METHODS[1], {}))
  out.append(Method(HF_METHODS[2], {"prompt_lookup_num_tokens": k}))
  if assistant is not None:
    g = assistant.generation_config
    g.num_assistant_tokens = k
    g.num_assistant_tokens_schedule = "constant"
    out.append(Method(HF_METHODS[3], {"assistant_model": assistant}))
  return out


def hf_generate(m, ids: list[int], max_new_tokens: int, method: Method):
  """(new tokens, seconds, target forward calls or None) for one prompt, batch 1, greedy."""
  import torch

  x = torch.tensor([ids], dtype=torch.long, device=_device(m))
  counter = _CallCounter(m) if method.count_calls else None
  try:
    with torch.inference_mode(), _quiet():
      _sync(m)
      t0 = time.perf_counter()
      out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                       do_sample=False, **method.call_kwargs(m))
      _sync(m)
      dt = time.perf_counter() - t0
  finally:
    if counter is not None:
      counter.remove()
  toks = out[0, len(ids):].tolist()
  eos = m.generation_config.eos_token_id
  eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
  pad = m.generation_config.pad_token_id
  # generate pads a finished batch-1 row only when it stops early; cut at the first stop token.
  for i, t in enumerate(toks):
    if t in eos:
      toks = toks[:i + 1]
      break
  else:
    while toks and pad is not None and toks[-1] == pad and pad not in eos:
      toks.pop()
  calls = counter.n if counter is not None else len(toks)  # plain: one forward per token
  return toks, dt, calls


def check_greedy(model, m, ids: list[int], n: int = 16) -> tuple[bool, list[int], list[int]]:
  """Greedy tokens of jaxspec and of the transformers model on one prompt."""
  import jaxspec

  want = jaxspec.generate(model, [ids], max_new_tokens=n, stop_tokens=()).tokens[0]
  got, _, _ = hf_generate(m, ids, n, Method("check", {}, count_calls=False))
  # transformers stops at a stop token (jaxspec was told not to): compare up to there.
  return len(got) > 0 and got == want[:len(got)], want, got


def run(m, ids: list[list[int]], categories: list[str], methods: list[Method], *,
        max_new_tokens: int, progress: bool = True) -> dict:
  """bench-style results {method: {"rows": [...], "compile_s": warm-up seconds}}."""
  from tqdm.auto import tqdm

  results = {}
  bar = tqdm(total=len(methods) * len(ids), desc="transformers", unit="run",
             disable=not progress)
  for meth in methods:
    t0 = time.perf_counter()
    hf_generate(m, ids[0], max_new_tokens, meth)  # warm-up (and torch.compile, if any)
    warm = time.perf_counter() - t0
    rows = []
    for cat, x in zip(categories, ids):
      toks, dt, calls = hf_generate(m, x, max_new_tokens, meth)
      rows.append({"category": cat, "tokens": len(toks), "target_calls": calls, "seconds": dt,
                   "output": toks})
      bar.set_postfix_str(f"{meth.name} {len(toks) / dt:.0f} tok/s")
      bar.update(1)
    results[meth.name] = {"rows": rows, "compile_s": warm}
  bar.close()
  return results


# ------------------------------------------------------------------------------- bench wiring


def encode(model, prompts: list[dict], max_new_tokens: int, chat: bool) -> list[list[int]]:
  """Token ids exactly as `jaxspec.bench.run` feeds jaxspec."""
  def one(p):
    if chat:
      return model.tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}],
                                                 tokenize=True)
    return model.tokenizer.encode(p["text"])

  room = model.config.max_seq_len - max_new_tokens
  return [one(p)[-room:] for p in prompts]


def _assistant_jax(model, a):
  import jaxspec

  if a.assistant:
    return jaxspec.load_model(a.assistant, progress=False), os.path.basename(a.assistant)
  layers = a.assistant_layers or default_assistant_layers(model.config.n_layers)
  return truncate(model, layers), f"first {layers}/{model.config.n_layers} layers"


def jaxspec_methods(model, a) -> list[tuple[str, object]]:
  """jaxspec's side of assisted generation: the same assistant as a `DraftModel`."""
  from jaxspec import drafters

  if model.config.n_layers < 2 and not a.assistant:
    return []
  asst, what = _assistant_jax(model, a)
  return [(f"draft ({what}) k={a.k}", drafters.DraftModel(asst, k=a.k))]


def compare(model, a, prompts: list[dict], results: dict, *, progress: bool = True) -> tuple[
    str, dict]:
  """Runs the transformers peers and returns (markdown section, their results)."""
  import torch

  ids = encode(model, prompts, a.max_new_tokens, a.chat)
  cats = [p["category"] for p in prompts]
  if getattr(a, "torch_threads", None):
    torch.set_num_threads(a.torch_threads)
  t0 = time.perf_counter()
  m = load_transformers(a.model, model)
  ok, want, got = check_greedy(model, m, ids[0])
  if not ok:
    raise RuntimeError(f"transformers and jaxspec disagree on greedy tokens for the first "
                       f"prompt (jaxspec {want}, transformers {got}); the export is wrong, "
                       f"nothing was timed")
  assistant = None
  asst_desc = "none"
  if model.config.n_layers >= 2 or a.assistant:
    asst_jax, asst_desc = _assistant_jax(model, a)
    if a.assistant:
      assistant = load_transformers(a.assistant, asst_jax)
    else:
      assistant = to_transformers(asst_jax)
    del asst_jax  # transformers' copy is all that is needed now
  load_s = time.perf_counter() - t0
  longest = max(len(x) for x in ids) + a.max_new_tokens
  methods = hf_methods(a.k, assistant, static_len=-(-longest // 128) * 128)
  peers = run(m, ids, cats, methods, max_new_tokens=a.max_new_tokens, progress=progress)
  info = dict(load_s=load_s, torch=torch.__version__, threads=torch.get_num_threads(),
              device=str(_device(m)), dtype=str(next(m.parameters()).dtype),
              cls=type(m).__name__, assistant=asst_desc, checked=len(want),
              source="loaded from the HF directory" if _is_hf(a.model) else
              "exported from jaxspec's params")
  return markdown(results, peers, info), peers


def _is_hf(source: str) -> bool:
  from jaxspec.models.load import detect_format

  from jaxspec import fetch

  try:
    return detect_format(fetch.resolve(source)) == "hf"
  except (OSError, ValueError):
    return False


def _table(results: dict, cats: list[str]) -> dict:
  """{method: {cat: (mean per-prompt tok/s, tau or None)}}."""
  out = {}
  for name, res in results.items():
    out[name] = {}
    for cat in cats:
      rows = [r for r in res["rows"] if cat == "overall" or r["category"] == cat]
      tps = sum(r["tokens"] / r["seconds"] for r in rows) / max(1, len(rows))
      calls = [r["target_calls"] for r in rows]
      tau = (sum(r["tokens"] for r in rows) / max(1, sum(calls))) if all(
          c is not None for c in calls) else None
      out[name][cat] = (tps, tau)
  return out


def markdown(results: dict, peers: dict, info: dict) -> str:
  import transformers

  allr = {**results, **peers}
  cats = list(dict.fromkeys(r["category"] for r in results["plain"]["rows"])) + ["overall"]
  t = _table(allr, cats)
  base_name = HF_METHODS[0] if HF_METHODS[0] in peers else HF_METHODS[1]
  plain_out = [r["output"] for r in results["plain"]["rows"]]
  same = {n: sum(r["output"] == p for r, p in zip(res["rows"], plain_out))
          for n, res in peers.items()}
  n = len(plain_out)
  lines = [
      "### Side by side with Hugging Face transformers", "",
      f"transformers {transformers.__version__}, torch {info['torch']} on {info['device']} "
      f"({info['threads']} threads), {info['cls']} in {info['dtype']}, {info['source']}; "
      f"greedy tokens checked equal to jaxspec on the first prompt ({info['checked']} tokens) "
      f"before timing. Batch 1, greedy, `torch.inference_mode`, one warm-up call per method; "
      f"prompt lookup and assisted generation use k = `num_assistant_tokens` = "
      f"`prompt_lookup_num_tokens` (constant schedule), assistant: {info['assistant']}. "
      f"Load/export {info['load_s']:.1f} s.", "",
      "Outputs identical to jaxspec plain decoding: " + ", ".join(
          f"{name} {same[name]}/{n}" for name in peers) + ".", "",
      "| method | tau | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
  for name in allr:
    tau = t[name]["overall"][1]
    cells = [f"{t[name][c][0]:.1f} ({t[name][c][0] / t[base_name][c][0]:.2f}x)" for c in cats]
    who = name if name in peers else f"jaxspec {name}"
    lines.append(f"| {who} | {'-' if tau is None else f'{tau:.2f}'} | " + " | ".join(cells)
                 + " |")
  lines += ["", f"Cells: mean per-prompt tokens/s (ratio to {base_name}, same prompts). "
            f"tau: tokens per target forward, prefill included (transformers' counted with a "
            f"forward hook on the target).", ""]
  return "\n".join(lines)
