"""The `jaxspec` command: generate | bench."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  jaxspec generate "Once upon a time"
  jaxspec generate "Once upon a time" --drafter early-exit:4 --k 4
  jaxspec generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat "What is the capital of France?"
  jaxspec bench --limit 2 --max-new-tokens 64
"""


def parse_drafter(spec: str | None, k: int, tree=None):
  """'ngram[:N]' | 'early-exit:L' | 'draft:SRC' -> a drafter object (None for 'none')."""
  from jaxspec import drafters, load_model

  if spec is None or spec == "none":
    return None
  name, _, arg = spec.partition(":")
  if name == "ngram":
    return drafters.NGram(n=int(arg) if arg else 3, k=k, tree=tree)
  if name in ("early-exit", "early_exit", "earlyexit"):
    if not arg:
      raise SystemExit("--drafter early-exit needs a layer count, e.g. early-exit:4")
    return drafters.EarlyExit(layers=int(arg), k=k, tree=tree)
  if name == "draft":
    if not arg:
      raise SystemExit("--drafter draft needs a model, e.g. draft:stories260K")
    return drafters.DraftModel(load_model(arg), k=k, tree=tree)
  raise SystemExit(f"unknown drafter {spec!r} (ngram[:N], early-exit:L, draft:SRC)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="stories260K",
                 help="stories260K (embedded), a .bin, a .gguf, an HF or Orbax directory")
  p.add_argument("--drafter", default=None,
                 help="none | ngram[:N] | early-exit:L | draft:SRC (default: none)")
  p.add_argument("--k", type=int, default=4, help="draft tokens per round (default 4)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)


def cmd_generate(a) -> int:
  import jaxspec

  model = jaxspec.load_model(a.model)
  drafter = parse_drafter(a.drafter, a.k)
  prompt = a.prompt
  if a.chat:
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=True)
  kw = dict(drafter=drafter, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
            top_k=a.top_k, top_p=a.top_p, seed=a.seed)
  if a.stream:
    for piece in jaxspec.stream(model, prompt, **kw):
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
  out = jaxspec.generate(model, [prompt], **kw)
  if not a.chat and isinstance(prompt, str):
    sys.stdout.write(prompt)
  print(out.texts[0])
  print(f"[{model.name}, drafter={a.drafter or 'none'}] {out.stats.summary()}", file=sys.stderr)
  return 0


def cmd_bench(a) -> int:
  from jaxspec import bench

  return bench.main(a)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jaxspec", description="Speculative decoding in one compiled JAX program.",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate", help="generate text (plain or speculative)", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  g.add_argument("prompt", nargs="?", default="Once upon a time")
  _add_sampling(g)
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  g.add_argument("--stream", action="store_true", help="print text as it is committed")
  g.set_defaults(fn=cmd_generate)
  b = sub.add_parser("bench", help="plain decoding and every drafter side by side")
  from jaxspec import bench
  bench.add_arguments(b)
  b.set_defaults(fn=cmd_bench)
  return p


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  try:
    return a.fn(a)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"jaxspec: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
