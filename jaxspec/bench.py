"""`jaxspec bench`: plain decoding and every drafter side by side, on Spec-Bench prompts.

Spec-Bench protocol: greedy, batch size 1, first turn of each question; speedup = mean per-prompt
tokens/s of a method over plain decoding on the same model and machine; tau = tokens per target
forward (bonus token included; plain decoding = 1.00). All methods run in one process, prompt
by prompt, after a warm-up that compiles every program, so compile time is reported apart.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from jaxspec import prompts as prompts_lib
from jaxspec import report

DEFAULT_OUT = "docs/benchmarks.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="stories260K")
  p.add_argument("--prompts", default=None,
                 help="Spec-Bench style JSONL (default: the bundled Spec-Bench question set)")
  p.add_argument("--limit", type=int, default=2, help="prompts per category (default 2)")
  p.add_argument("--categories", default=None, help="comma-separated subset of categories")
  p.add_argument("--drafters", default=None,
                 help="comma-separated: ngram[:N], early-exit:L, draft:SRC (default: ngram and "
                      "early exit at 3/4 and all-but-one of the layers)")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--tree", type=int, default=None,
                 help="also run every drafter with a token tree of N nodes, next to its chain")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
  p.add_argument("--speculate", choices=["auto", "always"], default=None,
                 help="auto (default): rounds speculate only while it pays (jaxspec.policy); "
                      "always: every round speculates")
  p.add_argument("--out", default=DEFAULT_OUT, help="markdown report to update ('-' = stdout only)")
  p.add_argument("--plot", default=None, help="PNG plot path (default: next to --out)")
  from jaxspec import peers, perf  # --compare-transformers; --batch-sizes and --roofline
  peers.add_arguments(p)
  perf.add_arguments(p)


def load_prompts(path: str | None, limit: int, categories: str | None) -> list[dict]:
  return prompts_lib.for_bench(path, limit, categories)


def default_drafters(config) -> list[str]:
  """What each registered drafter family contributes when `--drafters` is not given."""
  from jaxspec.drafters import registry

  return registry.bench_defaults(config)


def run(model, prompts: list[dict], methods: list[tuple[str, object]], *, max_new_tokens: int,
        chat: bool, progress: bool = True, speculate: str | None = None) -> dict:
  """Returns {method: {"rows": [...], "compile_s": float}}; each row has category, tokens,
  target_calls, seconds."""
  import jaxspec
  from tqdm.auto import tqdm

  def encode(p):
    if chat:
      return model.tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}],
                                                 tokenize=True)
    return model.tokenizer.encode(p["text"])

  ids = [encode(p) for p in prompts]
  room = model.config.max_seq_len - max_new_tokens
  ids = [x[-room:] for x in ids]  # keep the prompt's tail when it would not fit the context
  results = {}
  bar = tqdm(total=len(methods) * len(prompts), desc="bench", unit="run", disable=not progress)
  for name, drafter in methods:
    compile_s = 0.0
    rows = []
    for p, x in zip(prompts, ids):
      kw = dict(drafter=drafter, max_new_tokens=max_new_tokens, speculate=speculate)
      out = jaxspec.generate(model, [x], **kw)
      if out.stats.compile_s > 0 or out.stats.calibration_s > 0:  # time again, compiled
        compile_s += out.stats.compile_s
        out = jaxspec.generate(model, [x], **kw)
      rows.append({"category": p["category"], "tokens": out.stats.new_tokens,
                   "target_calls": out.stats.target_calls, "seconds": out.stats.run_s,
                   "output": out.tokens[0]})
      bar.set_postfix_str(f"{name} {out.stats.tokens_per_s:.0f} tok/s tau "
                          f"{out.stats.mean_accepted:.2f}")
      bar.update(1)
    results[name] = {"rows": rows, "compile_s": compile_s}
  bar.close()
  return results


def summarize(results: dict) -> tuple[list[str], dict]:
  """Per method and category: tau, mean tokens/s, speedup over plain (Spec-Bench definitions)."""
  plain = results["plain"]["rows"]
  cats = list(dict.fromkeys(r["category"] for r in plain)) + ["overall"]
  table = {}
  for name, res in results.items():
    table[name] = {}
    for cat in cats:
      rows = [r for r in res["rows"] if cat == "overall" or r["category"] == cat]
      base = [r for r in plain if cat == "overall" or r["category"] == cat]
      tps = [r["tokens"] / r["seconds"] for r in rows]
      base_tps = [r["tokens"] / r["seconds"] for r in base]
      tau = sum(r["tokens"] for r in rows) / max(1, sum(r["target_calls"] for r in rows))
      mean_tps = sum(tps) / len(tps)
      table[name][cat] = {"tau": tau, "tps": mean_tps,
                          "speedup": mean_tps / (sum(base_tps) / len(base_tps))}
  return cats, table


def same_outputs(results: dict) -> bool:
  plain = [r["output"] for r in results["plain"]["rows"]]
  return all([r["output"] for r in res["rows"]] == plain for res in results.values())


def markdown(model_name: str, command: str, cats: list[str], table: dict, results: dict,
             settings: str) -> str:
  lines = [f"## {model_name}", "",
           f"Command: `{command}`", "",
           f"Machine: {report.machine()}; {settings}.", "",
           "Greedy outputs identical to plain decoding for every method: "
           f"**{'yes' if same_outputs(results) else 'NO'}**.", "",
           "| method | compile s | " + " | ".join(cats) + " |",
           "|---|---|" + "---|" * len(cats)]
  for name, per in table.items():
    cells = [f"{per[c]['tau']:.2f} / {per[c]['speedup']:.2f}x" for c in cats]
    lines.append(f"| {name} | {results[name]['compile_s']:.1f} | " + " | ".join(cells) + " |")
  lines += ["", "Cells: tau (tokens per target forward) / speedup over plain decoding. "
            "Plain decoding tokens/s: " + ", ".join(
                f"{c} {table['plain'][c]['tps']:.1f}" for c in cats) + ".", ""]
  return "\n".join(lines)


def plot(path: str, model_name: str, cats: list[str], table: dict) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  width = 0.8 / len(table)
  for i, (name, per) in enumerate(table.items()):
    xs = [j + i * width for j in range(len(cats))]
    axes[0].bar(xs, [per[c]["tau"] for c in cats], width, label=name)
    axes[1].bar(xs, [per[c]["speedup"] for c in cats], width, label=name)
  for ax, title in zip(axes, ["tau (tokens / target forward)", "speedup over plain"]):
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_title(f"{model_name}: {title}")
    ax.axhline(1.0, color="gray", lw=0.8)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(a) -> int:
  import jaxspec

  if getattr(a, "roofline", False) or getattr(a, "batch_sizes", None):
    from jaxspec import perf
    return perf.roofline_main(a) if a.roofline else perf.batch_main(a)
  model = jaxspec.load_model(a.model)
  if model.tokenizer is None:
    raise ValueError(f"{a.model}: bench needs a model with a tokenizer")
  prompts = load_prompts(a.prompts, a.limit, a.categories)
  if not prompts:
    raise ValueError("no prompts selected")
  from jaxspec.drafters import registry
  names = registry.split(a.drafters) if a.drafters else default_drafters(model.config)

  methods = [("plain", None)] + registry.methods(names, a.k, a.tree)
  if getattr(a, "compare_transformers", False):
    from jaxspec import peers
    methods += peers.jaxspec_methods(model, a)
  t0 = time.perf_counter()
  results = run(model, prompts, methods, max_new_tokens=a.max_new_tokens, chat=a.chat,
                speculate=a.speculate)
  cats, table = summarize(results)
  command = report.command()
  settings = (f"{len(prompts)} prompts ({a.limit} per category), greedy, batch 1, "
              f"max_new_tokens={a.max_new_tokens}, k={a.k}, tree={a.tree}, "
              f"speculate={a.speculate or 'auto'}, "
              f"{time.perf_counter() - t0:.0f} s total")
  md = markdown(model.name, command, cats, table, results, settings)
  if getattr(a, "compare_transformers", False):
    import jax

    from jaxspec import engine, peers
    # transformers' copies of the target and assistant come next: drop the drafters (a draft
    # model holds its own weights) and the compiled programs first (Qwen 1.5B + 0.5B was
    # killed at 24 GB without this)
    del methods
    engine.PROGRAMS.clear()
    jax.clear_caches()
    gc.collect()
    md += "\n" + peers.compare(model, a, prompts, results)[0]
  print(md)
  if a.out != "-":
    png = a.plot or os.path.join(os.path.dirname(os.path.abspath(a.out)),
                                 f"bench_{model.name.replace('.', '_')}.png")
    if plot(png, model.name, cats, table):
      md += f"\n![{model.name}]({os.path.relpath(png, os.path.dirname(os.path.abspath(a.out)))})\n"
    report.update(a.out, model.name, md)
  if not same_outputs(results):
    print("jaxspec bench: speculative output differs from plain decoding", file=sys.stderr)
    return 1
  return 0
