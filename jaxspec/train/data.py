"""Self-distillation data: the target's own generations and its features, cached as .npy.

Prompts come from a JSONL file (lines with "prompt", "text" or "turns"), a text file (one prompt
per non-empty line) or a built-in set (story openings for TinyStories models such as
stories260K, the bundled Spec-Bench questions otherwise, minus the prompts `jaxspec bench`
measures: see `jaxspec.prompts`). The target continues every prompt
with `jaxspec.generate` (greedy, plus sampled copies), and one `forward` over prompt +
generation records the target's features (the residual stream before the final norm) at every
position. The target's distributions are recomputed from the features by its head (one matmul)
when training, so only tokens, lengths and features are stored:

    out_dir/data/tokens.npy  int32 [N, T]   prompt + generation, zero padded
    out_dir/data/lens.npy    int32 [N]      valid positions per row
    out_dir/data/feats.npy   float32 [N, T, D], or [N, T, (n + 1) D] with n tapped layers
                             (EAGLE-3: those layers' outputs, then the last layer's)
    out_dir/data/meta.json   what made them (reused when it matches)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.prompts import training_prompts

_NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Lucy", "Jack",
          "Sara", "Bob", "Amy", "Joe", "Kate", "Ben", "Zoe", "Leo", "Ella"]
_WHO = ["girl", "boy", "dog", "cat", "bird", "bunny", "bear", "fish", "frog", "duck", "mouse",
        "lion", "car", "tree", "princess"]
_TEMPLATES = [
    "Once upon a time, there was a little {who} named {name}.",
    "One day, a {who} named {name} went to the park.",
    "{name} was a happy {who}. Every day,",
    "Once upon a time, in a big forest, there lived a {who}.",
    "{name} and the {who} were best friends. One day,",
    "There was a small {who} who loved to play.",
    "{name} saw a big {who} in the garden.",
    "Once upon a time, {name} found a shiny",
]


def story_prompts() -> list[str]:
  """Simple TinyStories-style openings (a few hundred distinct ones)."""
  out = []
  for t in _TEMPLATES:
    for who in _WHO:
      names = _NAMES if "{name}" in t else _NAMES[:1]
      for name in names:
        out.append(t.format(who=who, name=name))
  return list(dict.fromkeys(out))


def _is_stories(model) -> bool:
  return str(model.name).lower().startswith("stories")


def read_prompts(path: str) -> list[tuple[str, str]]:
  """(kind, text) pairs: kind "chat" for prompt/turns entries, "text" for raw text."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"training data file not found: {path}")
  out = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  jsonl = path.endswith((".jsonl", ".json")) or (lines and lines[0].lstrip().startswith("{"))
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if not jsonl:
      out.append(("text", line))
      continue
    try:
      q = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    if isinstance(q, dict) and isinstance(q.get("prompt"), str):
      out.append(("chat", q["prompt"]))
    elif isinstance(q, dict) and isinstance(q.get("turns"), list) and q["turns"]:
      out.append(("chat", str(q["turns"][0])))
    elif isinstance(q, dict) and isinstance(q.get("text"), str):
      out.append(("text", q["text"]))
    else:
      raise ValueError(f"{path}:{i}: expected an object with a 'prompt', 'text' or 'turns' field")
  if not out:
    raise ValueError(f"{path}: no prompts found")
  return out


def encode_prompts(model, data: str | None, max_len: int) -> list[list[int]]:
  """Token ids of every prompt, at most `max_len` tokens (chat prompts keep their tail, so
  the assistant header survives; raw text keeps its head)."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.name!r} has no tokenizer; training data needs one")
  if data is None:
    items = ([("text", p) for p in story_prompts()] if _is_stories(model)
             else [("chat", p) for p in training_prompts()])
  else:
    items = read_prompts(data)
  out = []
  for kind, text in items:
    if kind == "chat" and getattr(tok, "chat_template", None):
      ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
      ids = ids[-max_len:]
    else:
      ids = tok.encode(text)[:max_len]
    if ids:
      out.append([int(t) for t in ids])
  return out


def split_prompts(prompts: list[list[int]], *, seed: int, n_train: int | None, n_eval: int):
  """Seeded shuffle; the last n_eval prompts are held out (never trained on)."""
  order = np.random.default_rng([seed, 7]).permutation(len(prompts))
  shuffled = [prompts[i] for i in order]
  if len(shuffled) < n_eval + 1:
    raise ValueError(f"need more than {n_eval} prompts (have {len(shuffled)})")
  held = shuffled[len(shuffled) - n_eval:] if n_eval else []
  train = shuffled[:len(shuffled) - n_eval]
  if n_train is not None:
    train = train[:n_train]
  return train, held


@dataclass
class Dataset:
  tokens: np.ndarray  # [N, T] int32
  lens: np.ndarray  # [N] int32
  feats: np.ndarray  # [N, T, D] float32 (memory-mapped)

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def batch(self, seed: int, step: int, size: int):
    """Batch `step` as host arrays (tokens, lens, feats): a pure function of (seed, step), so
    a resumed run sees the same data whatever mesh it runs on (every process of a multi-host
    job draws the same global batch and places only its own rows)."""
    rng = np.random.default_rng([seed, step])
    idx = np.sort(rng.choice(len(self), size, replace=len(self) < size))
    return (np.asarray(self.tokens[idx]), np.asarray(self.lens[idx]),
            np.asarray(self.feats[idx], np.float32))


def _hidden(params, cfg, ids, taps=()):
  """[B, T, D] the last layer's residual stream, after `taps` layers' outputs when given."""
  from jaxspec.models import forward
  out = forward(params, cfg, ids, logits=False, taps=taps)
  x = out.hidden if not taps else jnp.concatenate([out.taps, out.hidden], axis=-1)
  return x.astype(jnp.float32)


_hidden_jit = jax.jit(_hidden, static_argnums=(1, 3))


def _features_fn(params, mesh):
  """(params placed for the feature pass, fn(params, cfg, ids [B, T] host, taps) -> [B, T, F]
  host). On a mesh the target runs tensor parallel with its rows over "data", and the
  features come back whole to every process."""
  if mesh is None:
    return params, lambda p, cfg, ids, taps: np.asarray(
        _hidden_jit(p, cfg, jnp.asarray(ids), taps))
  from jax.sharding import NamedSharding, PartitionSpec

  from jaxspec import sharding
  fn = jax.jit(_hidden, static_argnums=(1, 3),
               out_shardings=NamedSharding(mesh, PartitionSpec()))

  def run(p, cfg, ids, taps):
    return np.asarray(fn(p, cfg, sharding.place(ids, sharding.batch_sharding(ids, mesh)), taps))
  return sharding.shard_params(params, mesh), run


def _fingerprint(prompts) -> str:
  h = hashlib.sha256()
  for p in prompts:
    h.update(np.asarray(p, np.int32).tobytes() + b"|")
  return h.hexdigest()[:16]


def build(model, prompts: list[list[int]], folder: str, *, seq_len: int, samples: int,
          temperature: float, seed: int, gen_batch: int = 32, progress: bool = True,
          mesh=None, taps: tuple[int, ...] = ()) -> Dataset:
  """Generates (or reuses) the self-distillation set for `prompts` in `folder`; on `mesh`, the
  generation and the feature pass run sharded over it. `taps`: layers whose outputs the
  features also hold (before the last layer's). Files go in place by atomic renames of
  per-process temporary files, so the processes of a multi-host job on one shared filesystem
  may all write the (identical) set."""
  from jaxspec.api import generate
  from tqdm.auto import tqdm

  c = model.config
  meta = {"model": str(model.name), "dim": c.dim, "vocab": c.vocab_size, "layers": c.n_layers,
          "seq_len": seq_len, "samples": samples, "temperature": temperature, "seed": seed,
          "prompts": _fingerprint(prompts), "n_prompts": len(prompts), "version": 1}
  taps = tuple(int(i) for i in taps)
  if taps:
    meta["taps"] = list(taps)
  meta_file = os.path.join(folder, "meta.json")
  files = {k: os.path.join(folder, f"{k}.npy") for k in ("tokens", "lens", "feats")}
  if os.path.exists(meta_file) and all(os.path.exists(f) for f in files.values()):
    with open(meta_file) as f:
      if json.load(f) == meta:
        return Dataset(np.load(files["tokens"]), np.load(files["lens"]),
                       np.load(files["feats"], mmap_mode="r"))
  os.makedirs(folder, exist_ok=True)
  with contextlib.suppress(FileNotFoundError):  # another process may have removed it
    os.remove(meta_file)

  longest = max(len(p) for p in prompts)
  if longest >= seq_len:
    raise ValueError(f"prompts of {longest} tokens leave no room in seq_len={seq_len}")
  max_new = min(seq_len - longest, c.max_seq_len - longest)
  n = len(prompts) * samples
  tokens = np.zeros((n, seq_len), np.int32)
  lens = np.zeros((n,), np.int32)
  jobs = [(s, i) for s in range(samples) for i in range(0, len(prompts), gen_batch)]
  bar = tqdm(total=n, desc="generating training data", unit="seq", disable=not progress)
  row = 0
  for s, i in jobs:
    chunk = prompts[i:i + gen_batch]
    temp = 0.0 if s == 0 else temperature
    padded = chunk + [chunk[0]] * (gen_batch - len(chunk))  # one batch shape: one compile
    out = generate(model, padded, max_new_tokens=max_new, temperature=temp,
                   seed=(seed * 1000003 + s * 7919 + i) % 2**32,  # jax reduced it so
                   mesh=mesh)
    for p, new in zip(chunk, out.tokens):
      seq = (p + new)[:seq_len]
      tokens[row, :len(seq)] = seq
      lens[row] = len(seq)
      row += 1
    bar.update(len(chunk))
  bar.close()

  tmp = f".tmp{jax.process_index()}"
  feats = np.lib.format.open_memmap(files["feats"] + tmp, mode="w+", dtype=np.float32,
                                    shape=(n, seq_len, (len(taps) + 1) * c.dim))
  params, hidden = _features_fn(model.params, mesh)
  for i in range(0, n, gen_batch):
    ids = np.zeros((gen_batch, seq_len), np.int32)
    part = tokens[i:i + gen_batch]
    ids[:len(part)] = part
    feats[i:i + len(part)] = hidden(params, c, ids, taps)[:len(part)]
  feats.flush()
  del feats
  os.replace(files["feats"] + tmp, files["feats"])
  for name, arr in (("tokens", tokens), ("lens", lens)):
    with open(files[name] + tmp, "wb") as f:
      np.save(f, arr)
    os.replace(files[name] + tmp, files[name])
  with open(meta_file + tmp, "w") as f:
    json.dump(meta, f)
  os.replace(meta_file + tmp, meta_file)  # last: its presence marks a complete set
  return Dataset(tokens, lens, np.load(files["feats"], mmap_mode="r"))
