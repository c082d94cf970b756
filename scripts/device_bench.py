"""Device measurements for issue 19 (run by scripts/device_check.sh; SMOKE=1 runs tiny shapes).

    python scripts/device_bench.py env     --out DIR
    python scripts/device_bench.py llama   --out DIR [--sections plain,oracle,tree,profile,hf]
    python scripts/device_bench.py llama   --out DIR --sections batch,batch_extra
    python scripts/device_bench.py smol    --out DIR
    python scripts/device_bench.py prep    # here, before the run: .devcheck/smollm2-tokenizer

Self-contained on purpose: it uses only jaxspec's core API (generate, Model, ModelConfig,
models.forward/KVCache/param_shapes, drafters.Oracle/NGram/EarlyExit, trees.Static,
load_model), not jaxspec.perf/bench internals, which are being refactored.

Every section appends its markdown to DIR/summary.md and merges its numbers into
DIR/results.json as soon as it ends, so a run killed by its timeout keeps what finished.
`--deadline` (epoch seconds) makes later sections skip themselves when time is short.

llama (the Llama-3-8B shape, random bf16 weights drawn on the device; SMOKE: a tiny shape),
sections in the order the device script runs them:
  plain   jaxspec plain greedy, batch 1, 32-token prompt, 128 new tokens (end-to-end tok/s and
          the per-token decode time from 128 vs 1 new tokens)
  oracle  Oracle k=2/4/8 (every draft right, tau = k + 1) vs plain at batch 1
  tree    one compiled loop per shape (as the engine runs it): decode T=1, chain verify
          T=8/16/32/64 and static-tree verify of 16/32/64 nodes (ancestor mask, depth
          positions), context 2048, timed round-robin; plus a 1 GiB copy-bandwidth probe and
          the decode step's share of the roofline (a backup for the roofline CLI step)
  profile jax.profiler trace of the decode and T=8 verify loops, top ops per trace line, and
          the optimized HLO of both (DIR/artifacts.tar.gz)
  hf      transformers LlamaForCausalLM of the same shape (random bf16 weights made on the GPU),
          static cache + torch.compile (generate's auto-compile, mode reduce-overhead), plain
          greedy, same prompt length and token count; then eager with the dynamic cache
  batch   plain and Oracle k=4 at batch 1/4/16/64 (128 new tokens per row)
  batch_extra  Oracle k=2 and k=8 at the same batch sizes
smol (SmolLM2-135M config, random weights, HF checkpoint saved to /tmp and loaded by jaxspec):
  jaxspec plain / Oracle k=4 / NGram(3, k=4) / EarlyExit(28 of 30, k=4) beside transformers
  static+compile greedy, prompt lookup (10 tokens) and eager greedy, batch 1, 6 Spec-Bench
  prompts (one per task) in the chat template, each cut/extended to 100 tokens (one compile).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, ".devcheck", "smollm2-tokenizer")
RANK_ACCEPTANCE = (0.6, 0.15, 0.08, 0.05)  # as jaxspec.cli's static trees


# ------------------------------------------------------------------------------- bookkeeping


class Report:
  """Appends markdown to OUT/summary.md and merges numbers into OUT/results.json per section."""

  def __init__(self, out: str, group: str, deadline: float | None):
    self.out, self.group, self.deadline = out, group, deadline
    os.makedirs(out, exist_ok=True)

  def left(self) -> float:
    return math.inf if self.deadline is None else self.deadline - time.time()

  def md(self, text: str) -> None:
    print(text, flush=True)
    with open(os.path.join(self.out, "summary.md"), "a") as f:
      f.write(text.rstrip("\n") + "\n\n")

  def save(self, section: str, data) -> None:
    path = os.path.join(self.out, "results.json")
    allr = {}
    if os.path.exists(path):
      try:
        with open(path) as f:
          allr = json.load(f)
      except ValueError:
        allr = {}
    allr.setdefault(self.group, {})[section] = data
    with open(path + ".tmp", "w") as f:
      json.dump(allr, f, indent=1, default=str)
    os.replace(path + ".tmp", path)

  def section(self, name: str, fn, need_s: float = 0.0) -> bool:
    """Runs fn() unless fewer than need_s seconds are left; records errors, never raises."""
    if self.left() < need_s:
      msg = f"skipped: {self.left():.0f} s left, needs about {need_s:.0f} s"
      self.md(f"### {self.group}/{name}: {msg}")
      self.save(name, {"skipped": msg})
      return False
    t0 = time.time()
    print(f"--- {self.group}/{name} (deadline in {self.left():.0f} s)", flush=True)
    try:
      fn()
      return True
    except Exception as e:  # keep going: the next section may still work
      tb = traceback.format_exc()
      print(tb, file=sys.stderr, flush=True)
      self.md(f"### {self.group}/{name}: FAILED after {time.time() - t0:.0f} s\n\n```\n"
              f"{tb[-3000:]}\n```")
      self.save(name, {"error": f"{type(e).__name__}: {e}", "traceback": tb[-3000:]})
      return False
    finally:
      print(f"--- {self.group}/{name} took {time.time() - t0:.1f} s", flush=True)


def table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def machine() -> str:
  import jax

  dev = jax.devices()[0]
  return (f"{dev.platform} ({getattr(dev, 'device_kind', '')}), jax {jax.__version__}, "
          f"{os.cpu_count()} host cores, {platform.machine()}")


# ------------------------------------------------------------------------------------ models


def llama_config(smoke: bool):
  """The Llama-3-8B shape (as jaxspec.perf's `llama3-8b`), or a tiny one for SMOKE."""
  from jaxspec.models import ModelConfig, RopeScaling

  if smoke:
    return "tiny", ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=344,
                               vocab_size=512, max_seq_len=4096, tied_embeddings=False,
                               rope_theta=500000.0)
  return "llama3-8b", ModelConfig(
      dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
      max_seq_len=8192, rope_theta=500000.0, tied_embeddings=False,
      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192))


def device_params(config, dtype, seed: int = 0, scale: float = 0.02):
  """Random params drawn on the default device (as jaxspec.perf.device_params)."""
  import jax
  import jax.numpy as jnp

  from jaxspec.models import param_shapes

  flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config),
                                                       is_leaf=lambda s: isinstance(s, tuple))

  def make(key):
    keys = jax.random.split(key, len(flat))
    return [jnp.ones(shape, dtype) if "norm" in jax.tree_util.keystr(path) else
            (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype)
            for (path, shape), k in zip(flat, keys)]

  out = jax.jit(make)(jax.random.key(seed))
  return jax.block_until_ready(jax.tree.unflatten(treedef, out))


def hf_config(c, *, bos: int | None = None, eos: int | None = None):
  """A transformers LlamaConfig of a jaxspec ModelConfig (rotate-half RoPE, as HF)."""
  import transformers

  kw = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta, tie_word_embeddings=c.tied_embeddings,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=0, torch_dtype="bfloat16")
  if c.rope_scaling is not None:
    s = c.rope_scaling
    kw["rope_scaling"] = dict(rope_type="llama3", rope_theta=float(c.rope_theta),
                              factor=float(s.factor), low_freq_factor=float(s.low_freq_factor),
                              high_freq_factor=float(s.high_freq_factor),
                              original_max_position_embeddings=int(
                                  s.original_max_position_embeddings))
  return transformers.LlamaConfig(**kw)


def hf_random_model(cfg, device: str):
  """LlamaForCausalLM with its own random init, built directly on `device` in bf16."""
  import torch
  import transformers

  old = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  try:
    with torch.device(device), quiet():
      torch.manual_seed(0)
      m = transformers.LlamaForCausalLM(cfg)
  finally:
    torch.set_default_dtype(old)
  m = m.to(device).eval()  # params are bf16 already; float32 buffers (RoPE) stay float32
  g = m.generation_config
  g.do_sample = False
  g.temperature = g.top_p = g.top_k = None
  g.eos_token_id = None  # random weights: never stop early, exactly max_new_tokens
  g.pad_token_id = 0
  return m


@contextlib.contextmanager
def quiet():
  import warnings

  try:
    from transformers.utils import logging as hf_logging
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
  except Exception:
    hf_logging = None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    if hf_logging is not None:
      hf_logging.set_verbosity(old)


# ------------------------------------------------------------------------- transformers runs


class HF:
  """Greedy generate of one transformers model, batch 1, timed with CUDA syncs.

  mode: "static" (one StaticCache of `cache_len` slots, reset per call, so generate
  auto-compiles the decode step with torch.compile on CUDA), "dynamic" (eager, default cache),
  or "lookup" (prompt lookup decoding, `lookup` tokens, dynamic cache)."""

  def __init__(self, m, mode: str, cache_len: int, lookup: int = 10):
    self.m, self.mode, self.cache_len, self.lookup = m, mode, cache_len, lookup
    self.cache = None
    self.dev = next(m.parameters()).device

  def sync(self):
    import torch

    if self.dev.type == "cuda":
      torch.cuda.synchronize()

  def kwargs(self) -> dict:
    if self.mode == "lookup":
      return {"prompt_lookup_num_tokens": self.lookup}
    if self.mode != "static":
      return {}
    if self.cache is None:
      from transformers import StaticCache

      try:
        self.cache = StaticCache(config=self.m.config, max_cache_len=self.cache_len)
      except TypeError:
        self.cache = StaticCache(config=self.m.config, max_batch_size=1,
                                 max_cache_len=self.cache_len, device=self.dev,
                                 dtype=next(self.m.parameters()).dtype)
    else:
      self.cache.reset()
    return {"past_key_values": self.cache}

  def __call__(self, ids: list[int], n: int):
    """(new tokens, seconds, target forwards or None)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long, device=self.dev)
    calls = [0]
    hook = self.m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) \
        if self.mode == "lookup" else None
    try:
      with torch.inference_mode(), quiet():
        kw = self.kwargs()
        self.sync()
        t0 = time.perf_counter()
        out = self.m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, **kw)
        self.sync()
        dt = time.perf_counter() - t0
    finally:
      if hook is not None:
        hook.remove()
    return out[0, len(ids):].tolist(), dt, (calls[0] if hook is not None else None)


# ---------------------------------------------------------------------- compiled fwd loops


_LOOPS: dict = {}


def fwd_loop(cfg, tree: bool):
  """jit: `reps` forwards of [B, T] tokens against a cache rewound after each pass (the
  engine's verify shape: all T logits, cache write, attention over the live buffer). With
  `tree`, per-node positions (length + depth) and an ancestor mask, as tree verification."""
  key = (cfg, tree)
  if key not in _LOOPS:
    import jax
    import jax.numpy as jnp

    from jaxspec.models import forward

    def run(params, tokens, cache, depth, mask, reps):
      start = cache.lengths

      def body(_, c):
        toks, cache = c
        kw = {}
        if tree:
          kw = dict(positions=cache.lengths[:, None] + depth[None, :], tree_mask=mask)
        out = forward(params, cfg, toks, cache, **kw)
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        return toks.at[:, 0].set(nxt), out.cache.rewind(start)

      return jax.lax.fori_loop(0, reps, body, (tokens, cache))

    _LOOPS[key] = jax.jit(run, donate_argnums=(2,))
  return _LOOPS[key]


def loop_args(cfg, params, batch: int, t: int, buf: int, fill: int, tree=None):
  import jax.numpy as jnp
  import numpy as np

  from jaxspec.models import KVCache

  dtype = params["embed"].dtype
  cache = KVCache.init(cfg, batch, buf, dtype).rewind(jnp.full((batch,), fill, jnp.int32))
  toks = jnp.ones((batch, t), jnp.int32)
  if tree is None:
    depth, mask = jnp.zeros((t,), jnp.int32), jnp.ones((t, t), bool)
  else:
    depth = jnp.asarray(np.asarray(tree.depths, np.int32))
    mask = jnp.asarray(tree.ancestor_mask())
  return toks, cache, depth, mask


def time_loops(cfg, params, shapes: dict, buf: int, fill: int, batch: int = 1,
               min_time: float = 0.1, repeats: int = 5) -> dict:
  """{label: (seconds per forward, compile seconds)} for shapes {label: (T, tree or None)},
  timed round-robin (each label once per repeat), best of `repeats`."""
  import jax
  import jax.numpy as jnp

  def once(label, reps):
    t, tree = shapes[label]
    toks, cache, depth, mask = loop_args(cfg, params, batch, t, buf, fill, tree)
    jax.block_until_ready((cache.k, toks))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd_loop(cfg, tree is not None)(params, toks, cache, depth, mask,
                                                            jnp.asarray(reps, jnp.int32)))
    return time.perf_counter() - t0

  reps, comp = {}, {}
  for label in shapes:
    comp[label] = once(label, 1)  # compile + one pass
    per = once(label, 2) / 2
    reps[label] = int(min(10_000, max(2, math.ceil(min_time / max(per, 1e-7)))))
  best = {label: math.inf for label in shapes}
  for _ in range(repeats):
    for label in shapes:
      best[label] = min(best[label], once(label, reps[label]) / reps[label])
  return {label: (best[label], comp[label]) for label in shapes}


# ------------------------------------------------------------------------------ jaxspec runs


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes per second of a device copy (read + write), as jaxspec.perf.copy_bandwidth."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  jax.block_until_ready(f(x))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t0)
  return 2 * x.nbytes / best


def jx_run(model, prompts, drafter, n: int, repeats: int = 2):
  """(fastest Result of `repeats` timed runs, compile seconds of the first call)."""
  import jaxspec

  kw = dict(drafter=drafter, max_new_tokens=n, stop_tokens=())
  first = jaxspec.generate(model, prompts, **kw)
  comp = first.stats.compile_s
  best = None
  for _ in range(max(1, repeats)):
    r = jaxspec.generate(model, prompts, **kw)
    if best is None or r.stats.run_s < best.stats.run_s:
      best = r
  return best, comp


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
  import numpy as np

  rng = np.random.default_rng(seed)
  return rng.integers(3, min(vocab, 32000), size=(batch, length)).tolist()


# ------------------------------------------------------------------------------------- llama


def cmd_llama(a) -> int:
  import jax
  import jax.numpy as jnp

  import jaxspec
  from jaxspec import drafters, trees

  rep = Report(a.out, "llama", a.deadline)
  smoke = a.smoke
  name, cfg = llama_config(smoke)
  sections = a.sections.split(",")
  new = 16 if smoke else 128
  plen = 32
  context = 128 if smoke else 2048
  t0 = time.time()
  params = device_params(cfg, jnp.bfloat16)
  init_s = time.time() - t0
  model = jaxspec.Model(cfg, params, None, name=f"{name} (random bfloat16)")
  nparams = sum(x.size for x in jax.tree.leaves(params))
  weights_b = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  if not cfg.tied_embeddings:
    weights_b -= params["embed"].size * params["embed"].dtype.itemsize  # one row per token
  rep.md(f"## {model.name}: device_bench llama ({','.join(sections)})\n\n"
         f"Machine: {machine()}. {nparams / 1e6:.1f}M params in bfloat16 ({weights_b / 1e9:.2f} "
         f"GB read per decode step, embedding rows excluded), drawn on the device in "
         f"{init_s:.1f} s.")
  prompt = random_prompts(cfg.vocab_size, 1, plen, 0)
  st: dict = {}

  def plain():
    r, comp = jx_run(model, prompt, None, new, repeats=3)
    r1, _ = jx_run(model, prompt, None, 1, repeats=3)  # same program (max_new is traced)
    dec = (r.stats.run_s - r1.stats.run_s) / (new - 1)
    st["plain"] = r
    d = dict(tok_s=new / r.stats.run_s, run_s=r.stats.run_s, prefill_1tok_s=r1.stats.run_s,
             decode_ms=dec * 1e3, decode_tok_s=1 / dec if dec > 0 else None,
             compile_s=comp, weights_gb=weights_b / 1e9,
             weights_roofline_ms_at_4p3TBs=weights_b / 4.3e12 * 1e3)
    rep.save("plain", d)
    rep.md("### jaxspec plain greedy, batch 1\n\n" + table(
        ["prompt", "new tokens", "end-to-end", f"decode step ({new} vs 1 new)", "compile"],
        [[plen, new, f"{d['tok_s']:.1f} tok/s ({r.stats.run_s * 1e3:.1f} ms)",
          f"{d['decode_ms']:.3f} ms ({d['decode_tok_s'] or 0:.1f} tok/s)",
          f"{comp:.1f} s"]]))

  def hf():
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t1 = time.time()
    m = hf_random_model(hf_config(cfg), dev)
    build_s = time.time() - t1
    rows, d = [], {"build_s": build_s, "torch": torch.__version__,
                   "transformers": transformers.__version__, "device": dev,
                   "attn": getattr(m.config, "_attn_implementation", None)}
    cache_len = -(-(plen + new + 1) // 128) * 128
    jx = rep_get("plain")
    for mode in ["static", "dynamic"]:
      if rep.left() < (60 if mode == "static" else 20):
        rows.append([mode, "skipped (time)", "", "", ""])
        continue
      h = HF(m, mode, cache_len)
      t1 = time.time()
      h(prompt[0], new)  # compile (static on CUDA) and warm
      h(prompt[0], 2)
      warm = time.time() - t1
      reps = 3 if mode == "static" else 1
      full = min(h(prompt[0], new)[1] for _ in range(reps))
      short = min(h(prompt[0], 2)[1] for _ in range(reps))
      dec = (full - short) / (new - 2)
      d[mode] = dict(tok_s=new / full, run_s=full, decode_ms=dec * 1e3, warmup_s=warm)
      ratio = (f"{(new / full) / jx['tok_s']:.2f}x" if jx and "tok_s" in jx else "-")
      rows.append([f"transformers {mode}" + (" + torch.compile" if mode == "static" and
                                            dev == "cuda" else " (eager)"),
                   f"{new / full:.1f} tok/s", f"{dec * 1e3:.3f} ms", ratio, f"{warm:.1f} s"])
      rep.save("hf", d)
    if jx and "tok_s" in jx:
      rows.insert(0, ["jaxspec plain (same process)", f"{jx['tok_s']:.1f} tok/s",
                      f"{jx['decode_ms']:.3f} ms", "1.00x", f"{jx['compile_s']:.1f} s"])
    rep.save("hf", d)
    rep.md(f"### transformers {transformers.__version__} (torch {torch.__version__}, {dev}) "
           f"beside jaxspec, same shape, batch 1, prompt {plen}, {new} new tokens\n\n"
           f"Random weights on both sides (different draws; cost does not depend on the "
           f"values). Static: one StaticCache of {cache_len} slots reset per call, so "
           f"`generate` auto-compiles the decode step (torch.compile, mode reduce-overhead) "
           f"on CUDA. Decode step = (time for {new} tokens - time for 2) / {new - 2}. Model "
           f"built in {build_s:.1f} s.\n\n" + table(
               ["engine", "end-to-end", "decode step", "vs jaxspec plain", "warm-up/compile"],
               rows))
    del m
    if dev == "cuda":
      torch.cuda.empty_cache()

  def oracle():
    base = st.get("plain") or jx_run(model, prompt, None, new)[0]
    ref = jx_run(model, prompt, None, new + 8, repeats=1)[0].tokens
    rows, d = [], {}
    ptps = new / base.stats.run_s
    rows.append(["plain", f"{ptps:.1f}", "1.00x", "1.00", "-", "-"])
    for k in (2, 4, 8):
      if rep.left() < 15:
        rows.append([f"oracle k={k}", "skipped (time)", "", "", "", ""])
        continue
      r, comp = jx_run(model, prompt, drafters.Oracle(ref, k=k), new)
      tps = new / r.stats.run_s
      same = r.tokens == base.tokens
      d[k] = dict(tok_s=tps, speedup=tps / ptps, tau=r.stats.mean_accepted, same=same,
                  compile_s=comp, ideal_speedup_if_verify_free=k + 1)
      rows.append([f"oracle k={k}", f"{tps:.1f}", f"{tps / ptps:.2f}x",
                   f"{r.stats.mean_accepted:.2f}", "yes" if same else "NO", f"{comp:.1f}"])
      rep.save("oracle", d)
    rep.save("oracle", d)
    rep.md(f"### Oracle (every draft right) vs plain, batch 1, prompt {plen}, {new} new tokens\n\n"
           + table(["method", "tok/s", "vs plain", "tau", "same tokens", "compile s"], rows))

  def tree():
    ts = [1, 8, 16, 32, 64] if not smoke else [1, 4, 8, 16]
    ns = [16, 32, 64] if not smoke else [8, 16]
    shapes = {f"chain T={t}": (t, None) for t in ts}
    for n in ns:
      shapes[f"tree {n} nodes"] = (n, trees.Static.from_acceptance(RANK_ACCEPTANCE, nodes=n))
    buf = -(-(context + max(max(ts), max(ns)) + 1) // 128) * 128
    res = time_loops(cfg, params, shapes, buf, context)
    dec = res["chain T=1"][0]
    d = {k: dict(ms=v[0] * 1e3, vs_decode=v[0] / dec, compile_s=v[1]) for k, v in res.items()}
    bw = copy_bandwidth((16 if smoke else 1024) << 20)
    kv_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # bytes per slot, bf16
    roof_buf = (weights_b + kv_slot * buf) / bw
    roof_live = (weights_b + kv_slot * context) / bw
    d["_roofline"] = dict(copy_bandwidth_gbs=bw / 1e9, decode_ms=dec * 1e3,
                          roofline_whole_buffer_ms=roof_buf * 1e3,
                          roofline_live_ms=roof_live * 1e3,
                          efficiency_whole_buffer=roof_buf / dec, efficiency_live=roof_live / dec)
    for n in ns:
      tr = shapes[f"tree {n} nodes"][1]
      d[f"tree {n} nodes"].update(depth=tr.max_depth, max_children=tr.max_children)
    d["_settings"] = dict(buf=buf, context=context, batch=1)
    rep.save("tree", d)
    rows = [[k, f"{v['ms']:.3f}", f"{v['vs_decode']:.2f}x", f"{v['compile_s']:.1f}"]
            for k, v in d.items() if not k.startswith("_")]
    r = d["_roofline"]
    rep.md(f"### Verify cost, chain and static tree, batch 1, {context} live of {buf} slots\n\n"
           f"Decode step {r['decode_ms']:.3f} ms ({1e3 / r['decode_ms']:.1f} tok/s); copy "
           f"bandwidth (read + write) {r['copy_bandwidth_gbs']:.0f} GB/s; roofline (weights + "
           f"KV of the whole buffer / of the live entries) {r['roofline_whole_buffer_ms']:.3f} / "
           f"{r['roofline_live_ms']:.3f} ms: {r['efficiency_whole_buffer'] * 100:.0f}% / "
           f"{r['efficiency_live'] * 100:.0f}% of it.\n\n"
           f"Each shape is one compiled loop of forwards (all T logits, cache write, rewind), "
           f"timed round-robin, best of 5. Trees: `trees.Static.from_acceptance({RANK_ACCEPTANCE},"
           f" nodes=N)` with per-node depth positions and the ancestor mask.\n\n"
           + table(["pass", "ms", "vs decode step", "compile s (first call)"], rows))

  def profile():
    prof_dir = "/tmp/jaxspec_profile"
    shutil.rmtree(prof_dir, ignore_errors=True)
    os.makedirs(prof_dir)
    buf = -(-(context + 64 + 1) // 128) * 128
    hlo = {}
    reps = 20
    labels = {"decode T=1": 1, "verify T=8": 8}
    for label, t in labels.items():  # compile outside the trace
      args = loop_args(cfg, params, 1, t, buf, context)
      fn = fwd_loop(cfg, False)
      try:
        hlo[label] = fn.lower(params, *args, jnp.asarray(reps, jnp.int32)).compile().as_text()
      except Exception as e:
        hlo[label] = f"as_text failed: {e}"
      jax.block_until_ready(fn(params, *loop_args(cfg, params, 1, t, buf, context),
                               jnp.asarray(2, jnp.int32)))
    from jax import profiler as jprof

    per = {}
    for label, t in labels.items():
      sub = os.path.join(prof_dir, label.replace(" ", "_").replace("=", ""))
      args = loop_args(cfg, params, 1, t, buf, context)
      jax.block_until_ready(args)
      with jprof.trace(sub, create_perfetto_trace=True):
        jax.block_until_ready(fwd_loop(cfg, False)(params, *args, jnp.asarray(reps, jnp.int32)))
      per[label] = summarize_trace(sub, reps)
    hlo_dir = os.path.join(prof_dir, "hlo")
    os.makedirs(hlo_dir)
    for label, text in hlo.items():
      with open(os.path.join(hlo_dir, label.replace(" ", "_").replace("=", "") + ".txt"),
                "w") as f:
        f.write(text)
    with open(os.path.join(prof_dir, "top_ops.json"), "w") as f:
      json.dump(per, f, indent=1)
    pack(prof_dir, os.path.join(a.out, "artifacts.tar.gz"))
    rep.save("profile", per)
    parts = [f"### Profile: top ops per forward ({reps} forwards traced per shape, batch "
             f"1, {context} live of {buf} slots), per trace line; the traces and the optimized "
             f"HLO are in artifacts.tar.gz"]
    for label, p in per.items():
      for ln in p.get("lines", [])[:3]:
        parts.append(f"{label} ({p.get('note', '')}), line `{ln['line']}`: busy "
                     f"{ln['busy_ms_per_fwd']:.3f} ms per forward, "
                     f"{ln['events_per_fwd']:.0f} events per forward\n\n" + table(
                         ["op", "ms per forward", "share", "count per forward"],
                         [[o["name"][:90].replace("|", "/"), f"{o['ms_per_fwd']:.4f}",
                           f"{o['share'] * 100:.1f}%", f"{o['count_per_fwd']:.1f}"]
                          for o in ln["top"][:15]]))
      if not p.get("lines"):
        parts.append(f"{label}: {p.get('note', '')}")
    rep.md("\n\n".join(parts))

  def batch(ks, label):
    sizes = [1, 2, 4] if smoke else [1, 4, 16, 64]
    rows = {}
    d = {}
    for b in sizes:
      if rep.left() < 20:
        d[b] = "skipped (time)"
        break
      prompts = random_prompts(cfg.vocab_size, b, plen, 100 + b)
      base, comp = jx_run(model, prompts, None, new)
      ref = jx_run(model, prompts, None, new + max(ks), repeats=1)[0].tokens
      ptps = base.stats.new_tokens / base.stats.run_s
      cells = {"plain": dict(tok_s=ptps, speedup=1.0, tau=1.0, same=True, compile_s=comp)}
      for k in ks:
        if rep.left() < 10:
          break
        r, c = jx_run(model, prompts, drafters.Oracle(ref, k=k), new)
        tps = r.stats.new_tokens / r.stats.run_s
        cells[f"oracle k={k}"] = dict(tok_s=tps, speedup=tps / ptps, tau=r.stats.mean_accepted,
                                      same=r.tokens == base.tokens, compile_s=c)
      d[b] = cells
      rep.save(label, d)
      for name, c in cells.items():
        rows.setdefault(name, {})[b] = c
    rep.save(label, d)
    done = [b for b in sizes if isinstance(d.get(b), dict)]
    same = all(c["same"] for per in rows.values() for c in per.values())
    body = []
    for name, per in rows.items():
      body.append([name] + [
          (f"{per[b]['tok_s']:.0f} tok/s, {per[b]['speedup']:.2f}x, tau {per[b]['tau']:.2f}"
           if b in per else "-") for b in done])
    rep.md(f"### Batch scaling ({label}): total new tokens/s over the batch, {new} new tokens "
           f"per row, {plen}-token random prompts, fastest of 2 runs (prefill included); "
           f"greedy outputs identical to plain in every cell: **{'yes' if same else 'NO'}**\n\n"
           + table(["method"] + [f"batch {b}" for b in done], body))

  def rep_get(section):
    path = os.path.join(a.out, "results.json")
    try:
      with open(path) as f:
        return json.load(f).get("llama", {}).get(section)
    except (OSError, ValueError):
      return None

  need = {"plain": 0, "hf": 60, "oracle": 30, "tree": 25, "profile": 15, "batch": 40,
          "batch_extra": 40}
  if smoke:
    need = {k: 0 for k in need}
  fns = {"plain": plain, "hf": hf, "oracle": oracle, "tree": tree, "profile": profile,
         "batch": lambda: batch([4], "batch"), "batch_extra": lambda: batch([2, 8], "batch_extra")}
  ok = True
  for s in sections:
    if s not in fns:
      raise SystemExit(f"unknown section {s!r} (known: {', '.join(fns)})")
    ok &= rep.section(s, fns[s], need[s])
  return 0 if ok else 1


def summarize_trace(folder: str, reps: int) -> dict:
  """Top ops by total duration per trace line (device streams when any, else every thread)
  from the perfetto trace jax.profiler wrote under `folder`. On a GPU the lines are e.g.
  'XLA Modules', 'XLA Ops' and the CUDA streams' kernels: each is summed on its own."""
  path = None
  for root, _, files in os.walk(folder):
    for f in sorted(files):
      if f == "perfetto_trace.json.gz" or (path is None and f.endswith(".trace.json.gz")):
        path = os.path.join(root, f)
  if path is None:
    return {"note": "no perfetto trace written", "lines": []}
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  pname, tname = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  dev = {p for p, n in pname.items() if ("/device:" in n or "GPU" in n) and "/host:" not in n}
  lines: dict = {}
  for e in events:
    if e.get("ph") != "X" or "dur" not in e or (dev and e.get("pid") not in dev):
      continue
    key = f"{pname.get(e.get('pid'), e.get('pid'))} / {tname.get((e.get('pid'), e.get('tid')), e.get('tid'))}"
    ops = lines.setdefault(key, {})
    a = ops.setdefault(str(e.get("name", "?")), [0.0, 0])
    a[0] += float(e["dur"])
    a[1] += 1
  out = []
  for key, ops in lines.items():
    busy = sum(v[0] for v in ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:25]
    out.append({"line": key, "busy_ms_per_fwd": busy / 1e3 / reps,
                "events_per_fwd": sum(v[1] for v in ops.values()) / reps,
                "top": [{"name": k, "ms_per_fwd": v[0] / 1e3 / reps,
                         "share": v[0] / max(busy, 1e-9), "count_per_fwd": v[1] / reps}
                        for k, v in top]})
  out.sort(key=lambda x: -x["busy_ms_per_fwd"])
  return {"note": "device lines" if dev else "no device line found: host threads",
          "file": os.path.relpath(path, folder), "lines": out[:6],
          "processes": sorted(set(pname.values()))[:20]}


def pack(folder: str, dest: str, limit: int = 15 << 20) -> None:
  """tar.gz of `folder` (HLO first, trace files dropped if the archive would pass `limit`)."""
  def build(skip_traces: bool):
    with tarfile.open(dest, "w:gz") as tar:
      for root, _, files in os.walk(folder):
        for f in files:
          p = os.path.join(root, f)
          if skip_traces and ("trace" in f or f.endswith(".pb")):
            continue
          tar.add(p, arcname=os.path.relpath(p, os.path.dirname(folder)))
  build(False)
  if os.path.getsize(dest) > limit:
    build(True)


# -------------------------------------------------------------------------------------- smol


SMOL = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
            max_seq_len=8192, rope_theta=100000.0, tied_embeddings=True)


def smol_prompts(model, n_tokens: int, limit: int) -> tuple[list[list[int]], list[str], str]:
  """One Spec-Bench prompt per task in the chat template (when the model has a tokenizer and a
  template), each cut to its last `n_tokens` ids or extended on the left with the others' ids,
  so every prompt is exactly `n_tokens` long (one compiled program per method)."""
  tok = model.tokenizer
  texts, cats = [], []
  try:
    from jaxspec import prompts as prompts_lib
    qs = prompts_lib.by_task(prompts_lib.spec_bench(None), limit=1)
    texts = [q["text"] for q in qs][:limit]
    cats = [q["task"] for q in qs][:limit]
  except Exception as e:
    print(f"spec-bench prompts unavailable ({e}); using random ids", flush=True)
  if tok is None or not texts:
    ids = random_prompts(model.config.vocab_size, limit, n_tokens, 7)
    return ids, [f"random{i}" for i in range(limit)], "random token ids (no tokenizer)"
  enc = []
  how = "chat template"
  for t in texts:
    if getattr(tok, "chat_template", None):
      enc.append(list(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True)))
    else:
      enc.append(list(tok.encode(t)))
      how = "plain text (no chat template)"
  pool = [x for e in enc for x in e]
  out = []
  for e in enc:
    if len(e) >= n_tokens:
      out.append(e[-n_tokens:])
    else:
      out.append((pool * (1 + n_tokens // max(1, len(pool))))[:n_tokens - len(e)] + e)
  return out, cats, f"{how}, Spec-Bench first turns, cut/extended to {n_tokens} tokens"


def cmd_smol(a) -> int:
  import torch
  import transformers

  import jaxspec
  from jaxspec import drafters
  from jaxspec.models import ModelConfig

  rep = Report(a.out, "smol", a.deadline)
  smoke = a.smoke
  spec = dict(SMOL)
  if smoke:
    spec.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
  cfg = ModelConfig(**spec)
  new = 16 if smoke else 128
  plen = 100
  nprompts = 3 if smoke else 6
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  folder = "/tmp/smollm2-135m-random-hf"
  st: dict = {}

  def build():
    t0 = time.time()
    shutil.rmtree(folder, ignore_errors=True)
    tok_ok = os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    m = hf_random_model(hf_config(cfg, bos=1, eos=2), dev)
    m.save_pretrained(folder)
    if tok_ok:
      for f in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), folder)
    t1 = time.time()
    try:
      model = jaxspec.load_model(folder, progress=False)
      how = "HF checkpoint saved by transformers, loaded by jaxspec.load_model"
    except Exception as e:  # fall back to jaxspec params exported to transformers
      print(f"jaxspec.load_model({folder}) failed: {e}; exporting instead", flush=True)
      traceback.print_exc()
      from jaxspec import peers
      import jax.numpy as jnp
      model = jaxspec.Model(cfg, device_params(cfg, jnp.bfloat16), None, name="smol-random")
      m = peers.to_transformers(model)
      g = m.generation_config
      g.eos_token_id, g.pad_token_id = None, 0
      how = f"jaxspec.load_model FAILED ({type(e).__name__}: {e}); jaxspec params exported"
    st.update(m=m, model=model)
    d = dict(save_load_s=time.time() - t0, jaxspec_load_s=time.time() - t1, how=how,
             tokenizer=tok_ok, dtype=str(model.dtype), files=sorted(os.listdir(folder)))
    rep.save("build", d)
    rep.md(f"## SmolLM2-135M shape (random weights): jaxspec beside transformers\n\n"
           f"Machine: {machine()}; transformers {transformers.__version__}, torch "
           f"{torch.__version__} on {dev}. {how}; {model.config.n_layers} layers, dim "
           f"{model.config.dim}, {model.dtype}, tokenizer: "
           f"{'SmolLM2 (from the GGUF)' if tok_ok else 'none'}; built in "
           f"{d['save_load_s']:.1f} s.")

  def compare():
    model, m = st["model"], st["m"]
    ids, cats, how = smol_prompts(model, plen, nprompts)
    methods = [("jaxspec plain", None),
               ("transformers static cache" + (" + torch.compile" if dev == "cuda" else
                                                " (eager on CPU)"), "static"),
               ("jaxspec oracle k=4 (all right)", "oracle"),
               ("jaxspec ngram n=3 k=4", drafters.NGram(n=3, k=4)),
               ("transformers prompt lookup (10)", "lookup"),
               (f"jaxspec early-exit {max(1, model.config.n_layers - 2)}/{model.config.n_layers} k=4",
                drafters.EarlyExit(layers=max(1, model.config.n_layers - 2), k=4)),
               ("transformers eager greedy", "dynamic")]
    res: dict = {}
    plain_out = None
    refs = None
    for name, d in methods:
      need = 60 if d == "static" else 12
      if rep.left() < need and not smoke:
        res[name] = {"skipped": f"{rep.left():.0f} s left"}
        continue
      t0 = time.time()
      outs, secs, calls = [], [], []
      if isinstance(d, str) and d != "oracle":  # transformers
        h = HF(m, d, -(-(plen + new + 1) // 128) * 128)
        h(ids[0], new)  # warm-up (compile for static on CUDA)
        if d == "static":
          h(ids[0], new)
        warm = time.time() - t0
        for x in ids:
          toks, dt, c = h(x, new)
          outs.append(toks)
          secs.append(dt)
          calls.append(c)
      else:
        if d == "oracle" and refs is None:
          res[name] = {"skipped": "no plain reference"}
          continue
        warm = 0.0
        for i, x in enumerate(ids):
          if name.startswith("jaxspec oracle"):  # one reference row per single-row call
            d = drafters.Oracle([refs[i]], k=4)
          out = jaxspec.generate(model, [x], drafter=d, max_new_tokens=new, stop_tokens=())
          if out.stats.compile_s > 0:
            warm += out.stats.compile_s
            out = jaxspec.generate(model, [x], drafter=d, max_new_tokens=new, stop_tokens=())
          outs.append(out.tokens[0])
          secs.append(out.stats.run_s)
          calls.append(out.stats.target_calls)
        if name == "jaxspec plain":
          plain_out = outs
          refs = [jaxspec.generate(model, [x], max_new_tokens=new + 4, stop_tokens=()).tokens[0]
                  for x in ids]
      tps = [len(o) / s for o, s in zip(outs, secs)]
      per_cat = {c: t for c, t in zip(cats, tps)}
      tau = (sum(len(o) for o in outs) / sum(calls)) if all(c for c in calls) else None
      same = (sum(o == p for o, p in zip(outs, plain_out)) if plain_out is not None else None)
      res[name] = dict(tok_s=sum(tps) / len(tps), per_prompt=per_cat, tau=tau, same=same,
                       warm_s=warm, wall_s=time.time() - t0)
      rep.save("compare", dict(prompts=how, max_new_tokens=new, methods=res))
    base = res["jaxspec plain"]["tok_s"]
    rows = []
    for name, r in res.items():
      if "skipped" in r:
        rows.append([name, r["skipped"], "", "", "", ""])
        continue
      rows.append([name, f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}x",
                   "-" if r["tau"] is None else f"{r['tau']:.2f}",
                   f"{r['same']}/{len(ids)}", f"{r['warm_s']:.1f}"])
    rep.save("compare", dict(prompts=how, max_new_tokens=new, methods=res))
    rep.md(f"Batch 1, greedy, {len(ids)} prompts ({how}), {new} new tokens each (no early "
           f"stop), mean per-prompt tok/s; tau = tokens per target forward (prefill included; "
           f"transformers' counted only for prompt lookup); 'same' = prompts whose tokens equal "
           f"jaxspec plain (transformers: a check of the two implementations in bf16, near-ties "
           f"may differ with random weights). Random weights make n-gram / early-exit "
           f"acceptance meaningless (outputs repeat); plain and oracle rows are what the "
           f"hardware does.\n\n" + table(
               ["method", "tok/s", "vs jaxspec plain", "tau", "same as jaxspec plain",
                "warm-up/compile s"], rows))

  ok = rep.section("build", build)
  ok = ok and rep.section("compare", compare)
  return 0 if ok else 1


# --------------------------------------------------------------------------------------- env


def cmd_env(a) -> int:
  rep = Report(a.out, "env", None)
  info: dict = {"python": sys.version, "executable": sys.executable}
  from importlib import metadata

  for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "numpy", "torch", "transformers", "tokenizers",
            "sentencepiece", "safetensors", "gguf", "tqdm", "jinja2", "matplotlib"):
    try:
      info[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      info[p] = None
  try:
    import jax
    info["jax_devices"] = [str(d) for d in jax.devices()]
    info["jax_platform"] = jax.devices()[0].platform
    info["device_kind"] = getattr(jax.devices()[0], "device_kind", "")
    import jaxspec
    info["jaxspec_file"] = jaxspec.__file__
    import jaxspec.models
    info["jaxspec_models_file"] = jaxspec.models.__file__
  except Exception as e:
    info["jax_error"] = f"{type(e).__name__}: {e}"
  try:
    import torch
    info["torch_cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name(0)
  except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
  for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR",
            "PYTHONPATH"):
    info[k] = os.environ.get(k)
  rep.save("env", info)
  missing = [p for p in ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors",
                         "tokenizers", "sentencepiece", "gguf", "tqdm", "jinja2", "torch",
                         "transformers") if info.get(p) is None]
  rep.md("## Environment\n\n" + table(["what", "value"], [[k, v] for k, v in info.items()]) +
         f"\n\nMissing packages: {', '.join(missing) or 'none'}.")
  if a.require_gpu and info.get("jax_platform") != "gpu":
    print("JAX sees no GPU: the device steps would run on the CPU", file=sys.stderr)
    return 3
  return 0


# -------------------------------------------------------------------------------------- prep


def cmd_prep(a) -> int:
  """Here, before the device run: SmolLM2's tokenizer (from the GGUF) as HF tokenizer files."""
  import jaxspec

  src = a.gguf
  if src is None:
    for p in ("/work/shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf",
              os.path.expanduser("~/.cache/jaxspec/checkpoints/smollm2-135m/"
                                 "SmolLM2-135M-Instruct.Q4_1.gguf")):
      if os.path.exists(p):
        src = p
        break
  if src is None:
    raise SystemExit("no SmolLM2 GGUF found; pass --gguf PATH")
  model = jaxspec.load_model(src, progress=False)
  tok = model.tokenizer
  os.makedirs(TOKENIZER_DIR, exist_ok=True)
  tok._tok.save(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
  tcfg = {"chat_template": tok.chat_template, "bos_token": tok._bos_token,
          "eos_token": tok._eos_token, "add_bos_token": bool(tok.add_bos),
          "model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast"}
  with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json"), "w") as f:
    json.dump(tcfg, f, indent=1)
  # Check the round trip through jaxspec's HF-directory tokenizer loader.
  from jaxspec.models.hf_tokenizer import load_tokenizer

  back = load_tokenizer(TOKENIZER_DIR, {"bos_token_id": tok.bos_id,
                                        "eos_token_id": list(tok.eos_ids)})
  msg = [{"role": "user", "content": "What is the capital of France?"}]
  same = (back.apply_chat_template(msg, tokenize=True) ==
          tok.apply_chat_template(msg, tokenize=True))
  print(f"wrote {TOKENIZER_DIR} from {src}: chat-template ids identical: {same}")
  return 0 if same else 1


def cmd_digest(a) -> int:
  """The key numbers of results.json and roofline.md, compact (for the run's output tail)."""
  path = os.path.join(a.out, "results.json")
  try:
    with open(path) as f:
      r = json.load(f)
  except (OSError, ValueError) as e:
    print(f"no results.json ({e})")
    return 1
  out = []
  roof = os.path.join(a.out, "roofline.md")
  if os.path.exists(roof):
    with open(roof) as f:
      for line in f:
        if any(w in line for w in ("copy bandwidth", "decode step, batch 1", "roofline effic",
                                   "| cost |", "| T |", "Compile time", "buffer: live")):
          out.append("roofline.md " + line.strip())
  L = r.get("llama", {})
  p = L.get("plain", {})
  if "tok_s" in p:
    out.append(f"jaxspec plain b1: {p['tok_s']:.1f} tok/s end-to-end, decode {p['decode_ms']:.3f}"
               f" ms, compile {p['compile_s']:.1f} s")
  t = L.get("tree", {})
  if "_roofline" in t:
    x = t["_roofline"]
    out.append(f"decode {x['decode_ms']:.3f} ms, bw {x['copy_bandwidth_gbs']:.0f} GB/s, "
               f"roofline {x['efficiency_whole_buffer'] * 100:.0f}% (whole buffer) / "
               f"{x['efficiency_live'] * 100:.0f}% (live)")
    out.append("verify vs decode: " + ", ".join(
        f"{k} {v['vs_decode']:.2f}x" for k, v in t.items() if not k.startswith("_")))
  o = L.get("oracle", {})
  if o and "error" not in o and "skipped" not in o:
    out.append("oracle b1: " + ", ".join(f"k={k} {v['speedup']:.2f}x (tau {v['tau']:.2f})"
                                         for k, v in o.items()))
  h = L.get("hf", {})
  for mode in ("static", "dynamic"):
    if mode in h and "tok_s" in p:
      out.append(f"transformers {mode}: {h[mode]['tok_s']:.1f} tok/s, decode "
                 f"{h[mode]['decode_ms']:.3f} ms, jaxspec/transformers "
                 f"{p['tok_s'] / h[mode]['tok_s']:.2f}x, warm-up {h[mode]['warmup_s']:.0f} s")
  for lab in ("batch", "batch_extra"):
    b = L.get(lab, {})
    for bs, cells in b.items():
      if isinstance(cells, dict) and "error" not in cells and "traceback" not in cells:
        out.append(f"{lab} b={bs}: " + ", ".join(
            f"{n} {c['tok_s']:.0f} tok/s {c['speedup']:.2f}x" for n, c in cells.items()
            if isinstance(c, dict)))
  sm = r.get("smol", {}).get("compare", {}).get("methods", {})
  if sm:
    out.append("smol: " + ", ".join(
        f"{n} {v['tok_s']:.1f}" if "tok_s" in v else f"{n} {v.get('skipped')}"
        for n, v in sm.items()))
  for g, secs in r.items():
    for sname, v in secs.items():
      if isinstance(v, dict) and ("error" in v or "skipped" in v):
        out.append(f"{g}/{sname}: {v.get('error') or v.get('skipped')}")
  print("\n".join(out))
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("group", choices=["env", "llama", "smol", "prep", "digest"])
  p.add_argument("--out", default=os.environ.get("OUT", "out/device_check"))
  p.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1")
  p.add_argument("--deadline", type=float, default=None, help="epoch seconds")
  p.add_argument("--sections", default="plain,oracle,tree,profile,hf")
  p.add_argument("--require-gpu", action="store_true")
  p.add_argument("--gguf", default=None)
  a = p.parse_args(argv)
  return {"env": cmd_env, "llama": cmd_llama, "smol": cmd_smol, "prep": cmd_prep,
          "digest": cmd_digest}[a.group](a)


if __name__ == "__main__":
  sys.exit(main())
