"""The `jaxspec` command: generate | bench | run | train-drafter.

Bad input ends in one line on stderr (`jaxspec: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from jaxspec import interrupt

EXAMPLES = """examples:
  jaxspec generate "Once upon a time"
  jaxspec generate "Once upon a time" --drafter early-exit:4 --k 4
  jaxspec generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat "What is the capital of France?"
  jaxspec bench --limit 2 --max-new-tokens 64
"""

GENERATE_EXAMPLES = """examples:
  jaxspec generate "Once upon a time"
  jaxspec generate "Once upon a time" --drafter early-exit:4 --k 4 --max-new-tokens 64
  jaxspec generate "Once upon a time" --drafter ngram:3 --temperature 0.8 --top-p 0.95
  jaxspec generate --model path/to/hf_dir --drafter draft:path/to/small_hf_dir --chat "Hi!"
  jaxspec generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat "What is the capital of France?"

Output streams as it is committed when stdout is a terminal (--no-stream: print at the end,
with stats on stderr).
"""

BENCH_EXAMPLES = """examples:
  jaxspec bench --limit 2                      # plain, ngram and early exit on Spec-Bench prompts
  jaxspec bench --drafters ngram,early-exit:4 --k 8 --out -
  jaxspec bench --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --categories qa,rag --limit 4
  jaxspec bench --prompts my_prompts.jsonl --out docs/benchmarks.md
"""

TRAIN_EXAMPLES = """examples:
  jaxspec train-drafter --kind eagle --out runs/eagle --steps 500
  jaxspec train-drafter --kind eagle3 --out runs/eagle3 --steps 500 --draft-vocab 256
  jaxspec generate "Once upon a time" --drafter eagle:runs/eagle --k 4
  jaxspec train-drafter --kind medusa --out runs/medusa --steps 500 --k 4
  jaxspec train-drafter --kind hydra --out runs/hydra --steps 500 --k 4 --draft-vocab 256
  jaxspec train-drafter --kind adapter --layers 1 --out runs/adapter --steps 500
  jaxspec generate "Once upon a time" --drafter kangaroo:runs/adapter --k 4
  jaxspec train-drafter --kind distill --layers 2 --out runs/small --steps 500
  jaxspec generate "Once upon a time" --drafter draft:runs/small/drafter
  jaxspec train-drafter --model path/to/hf_dir --kind eagle --data prompts.jsonl --out runs/x
  jaxspec train-drafter --kind eagle --out runs/eagle --steps 500 --mesh 8x1 --batch-size 32

A run resumes from its latest checkpoint in --out (--no-resume starts over), on the same mesh
or another one. On a TPU pod every host runs the same command (JAXSPEC_AUTO_DISTRIBUTED=1, or
JAXSPEC_COORDINATOR / JAXSPEC_NUM_PROCESSES / JAXSPEC_PROCESS_ID).
"""


def parse_drafter(spec: str | None, k: int | None = None, tree=None):
  """'ngram[:N]' | 'early-exit:L' | 'draft:SRC' | ... -> a drafter (None for 'none'), from the
  drafter registry (`jaxspec.drafters.registry`)."""
  from jaxspec.drafters import registry

  return registry.parse(spec, k, tree)


def _add_sampling(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="stories260K",
                 help="stories260K (embedded), a .bin, a .gguf, an HF or Orbax directory")
  p.add_argument("--drafter", default=None,
                 help="none | ngram[:N] | early-exit:L | layer-skip[:IDS] | draft:SRC[@N] | "
                      "recycling | medusa:CKPT | hydra:CKPT | eagle:CKPT (default: none)")
  p.add_argument("--k", type=int, default=None, help="draft tokens per round (default 4)")
  p.add_argument("--tree", type=int, default=None,
                 help="draft a token tree of N nodes instead of a chain (dynamic EAGLE-2 style, "
                      "k deep, for model drafters; static templates for ngram/recycling)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)


def cmd_generate(a) -> int:
  import jaxspec

  model = jaxspec.load_model(a.model)
  drafter = parse_drafter(a.drafter, a.k, a.tree)
  prompt = a.prompt
  if a.chat:
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
      raise ValueError(f"--chat needs a chat template, but {model.name} is a base model (its "
                       f"tokenizer has none); drop --chat to continue the prompt as plain text")
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=True)
  kw = dict(drafter=drafter, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
            top_k=a.top_k, top_p=a.top_p, seed=a.seed)
  if a.stream is None:
    a.stream = sys.stdout.isatty()
  if a.stream:
    if not a.chat:
      sys.stdout.write(prompt)
    for piece in jaxspec.stream(model, prompt, **kw):
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
  out = jaxspec.generate(model, [prompt], **kw)
  if a.chat:
    print(out.texts[0])
  else:  # decode prompt and output together, so the word boundary between them is kept
    ids = model.tokenizer.encode(prompt)
    print(prompt + model.tokenizer.decode(ids + out.tokens[0])[len(model.tokenizer.decode(ids)):])
  print(f"[{model.name}, drafter={a.drafter or 'none'}] {out.stats.summary()}", file=sys.stderr)
  return 0


def cmd_bench(a) -> int:
  from jaxspec import bench

  return bench.main(a)


RUN_EXAMPLES = """examples:
  jaxspec run --input prompts.jsonl --output out.jsonl --batch-size 16
  jaxspec run --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --input q.jsonl --output a.jsonl \\
      --drafter ngram --max-new-tokens 256

Input lines: {"id": 1, "prompt": "text" | [token ids]} or {"id": 1, "messages": [...]}.
Rerunning the same command resumes: ids already in --output are skipped.
"""


def cmd_run(a) -> int:
  from jaxspec import run

  return run.main(a)


def cmd_train_drafter(a) -> int:
  """Trains an EAGLE / Medusa / Hydra / Kangaroo / distilled drafter and prints how to use it."""
  import jaxspec
  from jaxspec import sharding

  sharding.initialize()  # a multi-host job (JAXSPEC_COORDINATOR ...); nothing on one host
  mesh = None if a.mesh is None else _mesh(a.mesh)
  model = jaxspec.load_model(a.model)
  kw = {key: getattr(a, key) for key in ("k", "batch_size", "seq_len", "lr", "seed",
                                         "eval_every", "layers", "num_prompts",
                                         "samples_per_prompt", "draft_vocab")
        if getattr(a, key) is not None}
  jaxspec.train.train_drafter(model, kind=a.kind, out_dir=a.out, steps=a.steps, data=a.data,
                              resume=not a.no_resume, mesh=mesh, **kw)
  family = {"distill": "draft", "eagle3": "eagle", "adapter": "kangaroo"}.get(a.kind, a.kind)
  use = f"{family}:{a.out}" + ("/drafter" if a.kind == "distill" else "")
  print(f"drafter saved to {a.out}/drafter; use it with --drafter {use}")
  return 0


def _mesh(text: str):
  """`--mesh DATAxTENSOR` ("8x1", "2x4", or "--mesh=-1x4": -1 is every device the other axis
  leaves)."""
  from jaxspec import sharding

  parts = text.lower().split("x")
  try:
    data, tensor = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"--mesh must be DATAxTENSOR, such as 8x1 or 2x4, got {text!r}") from None
  try:
    return sharding.make_mesh(data=data, tensor=tensor)
  except ValueError as e:
    raise ValueError(f"--mesh {text}: {str(e).removeprefix('make_mesh: ')}") from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jaxspec", description="Speculative decoding in one compiled JAX program.",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate", help="generate text (plain or speculative)",
                     epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  g.add_argument("prompt", nargs="?", default="Once upon a time")
  _add_sampling(g)
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                 help="print text as it is committed (default: when stdout is a terminal)")
  g.set_defaults(fn=cmd_generate)
  b = sub.add_parser("bench", help="plain decoding and every drafter side by side",
                     epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  from jaxspec import bench
  bench.add_arguments(b)
  b.set_defaults(fn=cmd_bench)
  r = sub.add_parser("run", help="generate over a JSONL file with continuous batching (resumes)",
                     epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_sampling(r)
  from jaxspec import run
  run.add_arguments(r)
  r.set_defaults(fn=cmd_run)
  t = sub.add_parser("train-drafter", help="train an EAGLE / Medusa / Hydra / Kangaroo / distilled drafter",
                     epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  t.add_argument("--model", default="stories260K", help="the target model (as for generate)")
  t.add_argument("--kind", required=True,
                 choices=["eagle", "eagle3", "medusa", "hydra", "adapter", "distill"])
  t.add_argument("--out", required=True, help="run directory (data, checkpoints, drafter/)")
  t.add_argument("--steps", type=int, default=1000)
  t.add_argument("--data", default=None, help="JSONL ({prompt|text|turns}) or text prompts")
  for flag, typ in (("--k", int), ("--batch-size", int), ("--seq-len", int), ("--lr", float),
                    ("--seed", int), ("--eval-every", int), ("--layers", int),
                    ("--num-prompts", int), ("--samples-per-prompt", int),
                    ("--draft-vocab", int)):
    t.add_argument(flag, type=typ, default=None)
  t.add_argument("--mesh", default=None, metavar="DATAxTENSOR",
                 help="train over a device mesh, e.g. 8x1 (data parallel) or 2x4; every host "
                      "of a multi-host job runs the same command")
  t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
  t.set_defaults(fn=cmd_train_drafter)
  return p


def main(argv=None) -> int:
  """The command. Run as a program (argv None) it first takes over Ctrl-C and SIGTERM, before
  anything imports jax: one line, `jaxspec: interrupted`, and exit status 130 (143 for
  SIGTERM) at any moment, never a traceback or a crash (see jaxspec.interrupt)."""
  if argv is None:
    interrupt.install()
  a = build_parser().parse_args(argv)
  try:
    return a.fn(a)
  except (ValueError, TypeError, OSError, NotImplementedError, FloatingPointError) as e:
    # One clean line for bad input (missing files, bad values, unsupported models), no traceback;
    # errors may carry the command-line wording (`--no-resume` rather than `resume=False`).
    msg = " ".join(str(getattr(e, "cli_message", None) or e).split()) or type(e).__name__
    print(f"jaxspec: error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if interrupt.installed():
      interrupt.exit_now(interrupt.requested())  # os._exit: XLA's threads may still be running
    print("jaxspec: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
