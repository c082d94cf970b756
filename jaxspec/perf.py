"""Performance measurements: `jaxspec bench --batch-sizes` and `jaxspec bench --roofline`.

`--batch-sizes 1,4,16,64`: throughput at each batch size of plain decoding, of the `Oracle`
drafter at k in {2, 4, 8} (it replays the target's own continuation, so tau = k + 1 exactly and
its speedup measures what the engine itself delivers), of the real drafters, and of the
adaptive policy (`generate(..., adaptive=True)`, which may pick plain decoding). Every row
generates exactly `max_new_tokens` (no early stop), so tokens/s are comparable across methods.

`--roofline --shape NAME`: a model built from a config with random weights generated on the
device: plain decode-step time at batch 1 against the HBM roofline (bytes of weights and KV
cache read per step / the faster of a large device copy and a read of it), the cost of verifying T
tokens relative to one decode step, and the compile time of the speculative loop. Small shapes
(`tiny`, `smollm-135m`) run on a CPU; `llama3-8b` is for an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

from jaxspec import report


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch-sizes", default=None,
                 help="comma-separated batch sizes: throughput table of plain, oracle k=2/4/8, "
                      "the drafters and the adaptive policy (e.g. 1,4,16,64)")
  p.add_argument("--oracle-k", default="2,4,8", help="oracle draft lengths for --batch-sizes")
  p.add_argument("--no-adaptive", action="store_true",
                 help="--batch-sizes: skip the adaptive-policy rows")
  p.add_argument("--repeats", type=int, default=3,
                 help="--batch-sizes: timed runs per cell, the fastest kept (default 3)")
  p.add_argument("--roofline", action="store_true",
                 help="decode step vs the memory roofline, verify cost vs tokens, compile time")
  p.add_argument("--shape", default=None,
                 help=f"--roofline model shape with random weights: {', '.join(SHAPES)} "
                      f"(default: the --model checkpoint)")
  p.add_argument("--dtype", default=None, help="--roofline weights dtype (default bfloat16)")
  p.add_argument("--context", type=int, default=1024,
                 help="--roofline: live KV entries per row during the measured steps")
  p.add_argument("--verify-tokens", default="2,4,8,16,64",
                 help="--roofline: tokens per verify pass to time against one decode step")
  p.add_argument("--copy-mib", type=int, default=None,
                 help="--roofline: size of the bandwidth probe (default 1024 MiB on "
                      "accelerators, 256 on CPU)")


def _llama3_scaling(factor: float):
  from jaxspec.models import RopeScaling
  return RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)


def _shapes():
  from jaxspec.models import ModelConfig

  return {
      "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=344,
                          vocab_size=512, max_seq_len=4096),
      "stories260K": ModelConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172,
                                 vocab_size=512, max_seq_len=4096),
      "smollm-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                 vocab_size=49152, max_seq_len=8192, rope_theta=100000.0),
      "llama3-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                               vocab_size=128256, head_dim=64, max_seq_len=8192,
                               rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0)),
      "llama3-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                               vocab_size=128256, head_dim=128, max_seq_len=8192,
                               rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0)),
      "llama3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                               vocab_size=128256, max_seq_len=8192, rope_theta=500000.0,
                               rope_scaling=_llama3_scaling(8.0), tied_embeddings=False),
  }


SHAPES = ("tiny", "stories260K", "smollm-135m", "llama3-1b", "llama3-3b", "llama3-8b")


def _ints(s: str, what: str) -> list[int]:
  try:
    out = [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated integers, got {s!r}") from None
  if not out or any(x < 1 for x in out):
    raise ValueError(f"{what} must be positive integers, got {s!r}")
  return out


# ------------------------------------------------------------------------------ batch scaling


def _timed(model, ids, drafter, max_new: int, adaptive: bool = False, repeats: int = 1):
  """The fastest of `repeats` compiled runs (a shared machine only ever adds time)."""
  import jaxspec

  kw = dict(drafter=drafter, max_new_tokens=max_new, stop_tokens=(), adaptive=adaptive)
  out = jaxspec.generate(model, ids, **kw)
  if out.stats.compile_s > 0 or adaptive:  # time again, compiled (and calibrated)
    out = jaxspec.generate(model, ids, **kw)
  for _ in range(repeats - 1):
    again = jaxspec.generate(model, ids, **kw)
    if again.stats.run_s < out.stats.run_s:
      out = again
  return out


def batch_scaling(model, ids: list[list[int]], batch_sizes: list[int],
                  drafter_specs: list[tuple[str, object]], *, max_new_tokens: int,
                  oracle_ks: list[int], adaptive: bool = True, repeats: int = 3,
                  progress: bool = True) -> dict:
  """{method: {batch: {"tps", "speedup", "tau", "same", "k"}}}: total new tokens / run seconds
  per method and batch size, speedup over plain at the same batch."""
  from tqdm.auto import tqdm

  from jaxspec import drafters

  n_methods = 1 + len(oracle_ks) + len(drafter_specs) * (2 if adaptive else 1)
  bar = tqdm(total=n_methods * len(batch_sizes), desc="batch scaling", unit="run",
             disable=not progress)
  table: dict = {}
  for b in batch_sizes:
    rows = [ids[i % len(ids)] for i in range(b)]
    ref = _timed(model, rows, None, max_new_tokens + max(oracle_ks, default=0))
    methods = [("plain", None, False)]
    methods += [(f"oracle k={k} (all accepted)", drafters.Oracle(ref.tokens, k=k), False)
                for k in oracle_ks]
    methods += [(name, d, False) for name, d in drafter_specs]
    if adaptive:
      methods += [(f"adaptive({name})", d, True) for name, d in drafter_specs]
    plain = None
    for name, d, ad in methods:
      out = _timed(model, rows, d, max_new_tokens, adaptive=ad, repeats=repeats)
      s = out.stats
      if plain is None:
        plain = out
      cell = {"tps": s.new_tokens / s.run_s, "tau": s.mean_accepted,
              "same": out.tokens == plain.tokens, "k": None,
              "verified": (s.drafts_verified, s.drafts_proposed)}
      if ad and s.policy is not None:
        cell["k"] = s.policy.k
        cell["predicted"] = s.policy.speedup
      table.setdefault(name, {})[b] = cell
      bar.set_postfix_str(f"b={b} {name} {cell['tps']:.0f} tok/s")
      bar.update(1)
    for name in table:
      if b in table[name]:
        table[name][b]["speedup"] = table[name][b]["tps"] / table["plain"][b]["tps"]
  bar.close()
  return table


def batch_markdown(model_name: str, table: dict, batch_sizes: list[int], settings: str) -> str:
  same = all(c["same"] for per in table.values() for c in per.values())
  lines = [f"## Batch scaling: {model_name}", "", f"Command: `{report.command()}`", "",
           f"Machine: {report.machine()}; {settings}.", "",
           f"Greedy outputs identical to plain decoding in every cell: "
           f"**{'yes' if same else 'NO'}**.", "",
           "| method | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
           "|---|" + "---|" * len(batch_sizes)]
  for name, per in table.items():
    cells = []
    for b in batch_sizes:
      c = per.get(b)
      if c is None:
        cells.append("-")
        continue
      txt = f"{c['tps']:.0f} tok/s, {c['speedup']:.2f}x, tau {c['tau']:.2f}"
      if c["k"] is not None:
        txt += " (plain)" if c["k"] == 0 else f" (k={c['k']})"
      cells.append(txt)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Cells: total new tokens / second over the batch, speedup over plain decoding "
            "at the same batch size, tau (tokens per target forward). Oracle rows replay the "
            "target's own continuation (tau = k + 1 exactly): their speedup is the most this "
            "engine can deliver at that k and batch. Adaptive rows: the k the policy picked "
            "(`plain` = it turned speculation off); its one-off calibration is not timed.", ""]
  return "\n".join(lines)


def batch_main(a) -> int:
  import jaxspec
  from jaxspec import peers, prompts as prompts_lib
  from jaxspec.drafters import registry

  sizes = _ints(a.batch_sizes, "--batch-sizes")
  oracle_ks = _ints(a.oracle_k, "--oracle-k") if a.oracle_k else []
  model = jaxspec.load_model(a.model)
  if model.tokenizer is None:
    raise ValueError(f"{a.model}: bench needs a model with a tokenizer")
  per_cat = max(a.limit, math.ceil(max(sizes) / 6))
  prompts = prompts_lib.for_bench(a.prompts, per_cat, a.categories)
  if not prompts:
    raise ValueError("no prompts selected")
  room = max(oracle_ks, default=0) + a.max_new_tokens
  ids = peers.encode(model, prompts, room, a.chat)
  names = a.drafters.split(",") if a.drafters else registry.bench_defaults(model.config)
  # Chains only (--drafters none: plain and oracle rows only).
  specs = [(label, d) for label, d in registry.methods(names, a.k, None) if d.tree is None]
  t0 = time.perf_counter()
  table = batch_scaling(model, ids, sizes, specs, max_new_tokens=a.max_new_tokens,
                        oracle_ks=oracle_ks, adaptive=not a.no_adaptive,
                        repeats=max(1, a.repeats))
  settings = (f"{len(ids)} Spec-Bench prompts cycled over the rows, greedy, "
              f"max_new_tokens={a.max_new_tokens} per row with no early stop, k={a.k}, "
              f"fastest of {max(1, a.repeats)} timed runs per cell (prefill included), "
              f"{time.perf_counter() - t0:.0f} s total")
  md = batch_markdown(model.name, table, sizes, settings)
  report.write(a.out, f"batch:{model.name}", md)
  ok = all(c["same"] for per in table.values() for c in per.values())
  if not ok:
    print("jaxspec bench: speculative output differs from plain decoding", file=sys.stderr)
  return 0 if ok else 1


# ----------------------------------------------------------------------------------- roofline


def _best_seconds(f, x, repeats: int) -> float:
  import jax
  jax.block_until_ready(f(x))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t0)
  return best


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes per second of a device copy (read + write of `nbytes`)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 4,), jnp.float32)
  return 2 * x.nbytes / _best_seconds(jax.jit(lambda x: x * 1.0001), x, repeats)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes per second of reading `nbytes` once (a sum over them), the access pattern of a
  decode step's weight reads. On CPU a copy also pays for the fresh output pages it writes,
  so it understates what a step can read (SmolLM2 fp32 reads 0.54 GB in 27 ms = 20 GB/s where
  a copy measures 6 GB/s)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 4,), jnp.float32)
  return x.nbytes / _best_seconds(jax.jit(jnp.sum), x, repeats)


def _nbytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def roofline(config, params, *, context: int, verify_tokens: list[int], copy_bytes: int,
             name: str = "model") -> dict:
  import jax.numpy as jnp

  from jaxspec import adaptive, drafters, engine, session
  from jaxspec.models import Model

  out: dict = {"name": name, "config": config, "dtype": str(params["embed"].dtype)}
  t0 = time.perf_counter()
  out["copy_bandwidth"] = copy_bandwidth(copy_bytes)
  out["read_bandwidth"] = read_bandwidth(copy_bytes)
  out["bandwidth"] = max(out["copy_bandwidth"], out["read_bandwidth"])
  out["bandwidth_probe_s"] = time.perf_counter() - t0
  buf = -(-(context + max(verify_tokens) + 1) // session.BUF_ALIGN) * session.BUF_ALIGN
  fill = context
  secs = adaptive.forward_seconds_many(params, config, 1, [1, *verify_tokens], buf, fill=fill)
  dec = secs[1]
  item = jnp.dtype(params["embed"].dtype).itemsize
  weights = _nbytes(params)
  if not config.tied_embeddings:  # the embedding lookup reads one row per token
    weights -= params["embed"].size * item
  kv_buf = 2 * config.n_layers * buf * config.n_kv_heads * config.head_dim * item
  kv_live = 2 * config.n_layers * fill * config.n_kv_heads * config.head_dim * item
  # Slots the attention reads: the whole buffer, or (live chunks, models.llama) the chunks
  # below the live length.
  from jaxspec.models.llama import live_attention_chunk
  chunk = live_attention_chunk(buf)
  read = buf if chunk is None else min(buf, -(-(fill + 1) // chunk) * chunk)
  kv_read = 2 * config.n_layers * read * config.n_kv_heads * config.head_dim * item
  out.update(decode_s=dec, weights_bytes=weights, kv_buffer_bytes=kv_buf, kv_live_bytes=kv_live,
             kv_read_bytes=kv_read, buf=buf, context=fill)
  out["roofline_s"] = (weights + kv_read) / out["bandwidth"]
  out["roofline_live_s"] = (weights + kv_live) / out["bandwidth"]
  # The same live context in a 4x larger buffer (a long max_new_tokens): costs the same when
  # attention reads only the live chunks.
  out["decode_4x_buffer_s"] = adaptive.forward_seconds_many(params, config, 1, [1], 4 * buf,
                                                            fill=fill)[1]
  out["decode_4x_buffer_dense_s"] = adaptive.forward_seconds_many(
      params, config, 1, [1], 4 * buf, fill=fill, attn_chunk=1 << 30)[1]
  out["verify"] = {t: secs[t] / dec for t in verify_tokens}
  # Compile time of the whole program (prefill + loop), plain and speculative.
  model = Model(config, params, None, name=name)
  prompt = [list(range(1, 17))]
  comp = {}
  for label, d in [("plain", None),
                   ("early-exit k=4", drafters.EarlyExit(layers=max(1, config.n_layers // 4),
                                                         k=4))]:
    fresh = engine.Programs()  # compile afresh, even if this shape ran before
    plan = session.prepare(model, prompt, drafter=d, max_new_tokens=8, stop_tokens=())
    state, c1 = session.start(model, plan, programs=fresh)
    _, c2 = session.run_rounds(model, plan, state, 1 << 30, programs=fresh)
    comp[label] = c1 + c2
  out["compile_s"] = comp
  return out


def roofline_markdown(r: dict, settings: str) -> str:
  c = r["config"]
  gb = 1e9
  lines = [f"## Roofline: {r['name']}", "", f"Command: `{report.command()}`", "",
           f"Machine: {report.machine()}; {settings}.", "",
           f"Shape: {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads} x "
           f"{c.head_dim}, MLP {c.hidden_dim}, vocab {c.vocab_size}, {c.num_params / 1e6:.0f}M "
           f"params in {r['dtype']}; KV buffer {r['buf']} slots with {r['context']} live.", "",
           "| quantity | value |", "|---|---|",
           f"| copy bandwidth (read + write) | {r['copy_bandwidth'] / gb:.1f} GB/s |",
           f"| read bandwidth (a sum over the buffer) | {r['read_bandwidth'] / gb:.1f} GB/s |",
           f"| weights read per decode step | {r['weights_bytes'] / gb:.3f} GB |",
           f"| KV per step: whole buffer / read (live chunks) / live entries | "
           f"{r['kv_buffer_bytes'] / gb:.3f} / {r['kv_read_bytes'] / gb:.3f} / "
           f"{r['kv_live_bytes'] / gb:.3f} GB |",
           f"| decode step, batch 1 (measured) | {r['decode_s'] * 1e3:.3f} ms "
           f"({1 / r['decode_s']:.0f} tok/s) |",
           f"| same context in a {4 * r['buf']}-slot buffer: live chunks / whole buffer "
           f"(measured) | {r['decode_4x_buffer_s'] * 1e3:.3f} / "
           f"{r['decode_4x_buffer_dense_s'] * 1e3:.3f} ms |",
           f"| roofline (weights + KV read) / the faster bandwidth | {r['roofline_s'] * 1e3:.3f} ms |",
           f"| roofline efficiency (roofline / measured) | "
           f"{r['roofline_s'] / r['decode_s'] * 100:.0f}% |", "",
           "Verify pass of T tokens (batch 1) relative to one decode step:", "",
           "| T | " + " | ".join(str(t) for t in r["verify"]) + " |",
           "|---|" + "---|" * len(r["verify"]),
           "| cost | " + " | ".join(f"{v:.2f}x" for v in r["verify"].values()) + " |", "",
           "Compile time of the generation program (prefill + speculative loop), seconds: " +
           ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items()) + ".", "",
           "Steps are timed inside one compiled loop (no per-step dispatch), as the engine "
           "runs them. Buffers of two or more models.llama.ATTN_CHUNK-slot chunks are attended in "
           "chunks, reading only those below the live length (the roofline counts the slots "
           "read); shorter buffers are read whole, masked.", ""]
  return "\n".join(lines)


def roofline_main(a) -> int:
  import jax
  import jax.numpy as jnp

  import jaxspec
  from jaxspec.models import init_params
  from jaxspec.models.load import resolve_dtype

  verify_tokens = _ints(a.verify_tokens, "--verify-tokens")
  dtype = resolve_dtype(a.dtype or "bfloat16")
  if a.shape:
    shapes = _shapes()
    if a.shape not in shapes:
      raise ValueError(f"unknown --shape {a.shape!r} (known: {', '.join(shapes)})")
    config = dataclasses.replace(shapes[a.shape],
                                 max_seq_len=max(shapes[a.shape].max_seq_len,
                                                 a.context + max(verify_tokens) + 256))
    params = init_params(config, 0, dtype, on_device=True)
    name = f"{a.shape} (random {jnp.dtype(dtype).name})"
  else:
    model = jaxspec.load_model(a.model, dtype=a.dtype)
    config, params, name = model.config, model.params, model.name
  on_cpu = jax.devices()[0].platform == "cpu"
  mib = a.copy_mib or (256 if on_cpu else 1024)
  t0 = time.perf_counter()
  r = roofline(config, params, context=a.context, verify_tokens=verify_tokens,
               copy_bytes=mib << 20, name=name)
  settings = (f"context {a.context}, bandwidth probe {mib} MiB, "
              f"{time.perf_counter() - t0:.0f} s total")
  md = roofline_markdown(r, settings)
  report.write(a.out, f"roofline:{name}", md)
  return 0
