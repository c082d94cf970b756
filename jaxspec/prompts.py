"""The bundled Spec-Bench prompt set (480 questions, 6 tasks), shared by `jaxspec bench` and the
drafter trainer.

Spec-Bench groups the 80 two-turn MT-bench questions (8 categories) as one task, `mt_bench`;
the other tasks are the file's categories. The benchmark takes the first prompts of each task;
training on the built-in set skips the first `BENCH_RESERVED` of each task, so a trained drafter
is never benchmarked (`jaxspec bench --limit <= BENCH_RESERVED`) on prompts it was trained on.
"""

from __future__ import annotations

import collections
import json
import os
from importlib import resources

BENCH_RESERVED = 10  # prompts per task kept out of built-in training data


def default_path() -> str:
  return str(resources.files("jaxspec") / "_data" / "spec_bench" / "question.jsonl")


def spec_bench(path: str | None = None) -> list[dict]:
  """Every question as {"task", "category", "text"} (first turn), in file order."""
  path = default_path() if path is None else path
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt file not found: {path}")
  out = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        q = json.loads(line)
        text = q["turns"][0] if "turns" in q else q["prompt"]
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}:{line_no}: not a Spec-Bench prompt line ({e})") from None
      cat = q.get("category", "all")
      task = "mt_bench" if len(q.get("turns", ())) > 1 else cat
      out.append({"task": task, "category": cat, "text": text})
  return out


def by_task(questions: list[dict], limit: int | None = None, skip: int = 0,
            tasks: set[str] | None = None) -> list[dict]:
  """Prompts `skip .. skip + limit` of each task (tasks in order of first appearance)."""
  per: dict[str, list[dict]] = collections.defaultdict(list)
  seen: collections.Counter = collections.Counter()
  for q in questions:
    if tasks and q["task"] not in tasks and q["category"] not in tasks:
      continue
    seen[q["task"]] += 1
    if seen[q["task"]] > skip and (limit is None or len(per[q["task"]]) < limit):
      per[q["task"]].append(q)
  return [q for t in per for q in per[t]]


def training_prompts() -> list[str]:
  """The built-in set minus the prompts the benchmark uses."""
  return [q["text"] for q in by_task(spec_bench(), skip=BENCH_RESERVED)]


def for_bench(path: str | None, limit: int, categories: str | None) -> list[dict]:
  """The first `limit` prompts of each Spec-Bench task (MT-bench grouped as one task), as
  {"category", "text"} rows; `categories` a comma-separated subset."""
  want = None if not categories else set(categories.split(","))
  qs = by_task(spec_bench(path), limit=limit, tasks=want)
  return [{"category": q["task"], "text": q["text"]} for q in qs]
