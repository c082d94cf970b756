"""`jaxspec run`: generation over a JSONL dataset with continuous batching; reruns resume.

    jaxspec run --model SRC --input in.jsonl --output out.jsonl [--batch-size 16] [--drafter ..]

Input: one JSON object per line, `{"id": .., "prompt": "text" | [token ids]}` or
`{"id": .., "messages": [{"role": .., "content": ..}, ..]}` (the chat template); without `id`
the line number is the id. Ids must be unique.

Output: one line per input line, `{"id", "text", "tokens", "new_tokens", "tau",
"finish_reason", "prompt_tokens", "settings"}`, appended with one write and flushed as each row
finishes. A rerun of the same command skips the ids already written, so each id ends up exactly
once however the job was stopped (a line cut short by a kill is dropped and regenerated).
`<output>.settings.json` records what produced the file (model weights, drafter, sampling
settings, seed); a rerun with other settings refuses to mix them into it and says which differ.

Many hosts: under `jaxspec.sharding.initialize()` (JAXSPEC_COORDINATOR / JAXSPEC_NUM_PROCESSES
/ JAXSPEC_PROCESS_ID, or JAXSPEC_AUTO_DISTRIBUTED=1 on a TPU pod) the same command runs on every
host. Process i takes the input lines at positions i, i + n, i + 2n, .. (a fixed split of the
file, whatever is already done) on its own devices (rows split over them: `--local-devices`)
and appends to `<output>.part-<i>`; no two
processes ever write the same id. When all are done, process 0 moves the parts' lines into
`<output>` (ids already there skipped, so an interrupted merge resumes too).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

SETTINGS_SUFFIX = ".settings.json"
PART = ".part-"


def add_arguments(p) -> None:
  """`run`'s own options (the model, drafter and sampling ones come from the CLI)."""
  p.add_argument("--input", required=True, help="JSONL prompts: {id, prompt | messages}")
  p.add_argument("--output", required=True, help="JSONL results, appended (resumes)")
  p.add_argument("--batch-size", type=int, default=16, help="slots in the loop (default 16)")
  p.add_argument("--chat", action="store_true",
                 help="wrap string prompts in the chat template as one user message")
  p.add_argument("--skip-bad-lines", action="store_true",
                 help="report malformed or too-long input lines and go on (default: stop)")
  p.add_argument("--insert-size", type=int, default=None,
                 help="prompts prefilled per refill (default batch-size / 16, at least 1)")
  p.add_argument("--local-devices", type=int, default=-1,
                 help="this process's devices to use, rows split over them (default -1: all)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                 help="progress bar on stderr (default: when stderr is a terminal)")


# ---------------------------------------------------------------------------------- input


@dataclasses.dataclass
class Line:
  number: int  # 1-based line number in the input file
  id: object
  prompt: object  # str | list[int] | chat messages (list of dicts)
  chat: bool  # `prompt` is a list of chat messages


def _bad(path: str, number: int, why: str, skip: bool, skipped: list) -> None:
  msg = f"{path}:{number}: {why}"
  if not skip:
    raise ValueError(msg + " (--skip-bad-lines to report such lines and go on)")
  print(f"jaxspec: skipping {msg}", file=sys.stderr)
  skipped.append(number)


def read_input(path: str, *, skip_bad: bool = False) -> tuple[list[Line], list[int]]:
  """Every prompt line of `path`, and the numbers of the lines skipped as malformed."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input file not found: {path}")
  lines, skipped, first_line = [], [], {}
  with open(path, encoding="utf-8") as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        _bad(path, number, f"not valid JSON ({e.msg} at column {e.colno})", skip_bad, skipped)
        continue
      why = _line_problem(obj)
      if why:
        _bad(path, number, why, skip_bad, skipped)
        continue
      id_ = obj.get("id", number)
      if id_ in first_line:
        raise ValueError(f"{path}:{number}: id {id_!r} repeats line {first_line[id_]}; ids "
                         f"must be unique")
      first_line[id_] = number
      chat = "messages" in obj
      lines.append(Line(number, id_, obj["messages"] if chat else obj["prompt"], chat))
  if not lines:
    raise ValueError(f"input file {path} has no prompts (it is empty or every line was "
                     f"skipped); each line is a JSON object like "
                     f'{{"id": 1, "prompt": "Once upon a time"}}')
  return lines, skipped


def _line_problem(obj) -> str | None:
  if not isinstance(obj, dict):
    return f"expected a JSON object, got {type(obj).__name__}"
  if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (int, str))):
    return f"id must be a string or an integer, got {obj['id']!r}"
  if "messages" in obj:
    m = obj["messages"]
    if not (isinstance(m, list) and m and all(isinstance(x, dict) and "content" in x for x in m)):
      return "messages must be a non-empty list of {role, content} objects"
    return None
  if "prompt" not in obj:
    return f"no 'prompt' or 'messages' key (keys: {sorted(obj)})"
  p = obj["prompt"]
  if isinstance(p, str):
    return None if p else "prompt is empty"
  if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                       for t in p):
    return None
  return "prompt must be a non-empty string or list of token ids"


# --------------------------------------------------------------------------------- output


def settings_of(a, model) -> dict:
  """What decides the output text: weights, drafter, sampling, seed, chat wrapping."""
  import jax
  import numpy as np

  from jaxspec.drafters import registry

  h = hashlib.sha256(repr(model.config).encode())
  for x in jax.tree.leaves(model.params):  # shapes, dtypes and leading values, not placement
    h.update(repr((x.shape, str(x.dtype))).encode())
    h.update(np.asarray(jax.device_get(x.reshape(-1)[:4096])).tobytes())
  digest = h.hexdigest()[:16]
  drafting = a.drafter not in (None, "none")
  k = registry.DEFAULT_K if a.k is None else a.k
  return {"model": a.model, "weights": digest, "drafter": a.drafter if drafting else None,
          "k": k if drafting else None, "tree": a.tree if drafting else None, "chat": a.chat,
          "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
          "top_p": a.top_p, "seed": a.seed}


def settings_hash(settings: dict) -> str:
  keep = {k: v for k, v in settings.items() if k != "model"}  # the path may differ, not weights
  return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _flag(key: str) -> str:
  return {"weights": "--model (its weights)", "model": "--model"}.get(
      key, "--" + key.replace("_", "-"))


def check_writable(output: str) -> None:
  """Fails before any work when the output cannot be appended to."""
  d = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(d):
    raise FileNotFoundError(f"output directory does not exist: {d}")
  if os.path.isdir(output):
    raise IsADirectoryError(f"--output {output} is a directory; give a file path")
  try:
    with open(output, "a"):
      pass
  except OSError as e:
    raise PermissionError(f"cannot write --output {output}: {e.strerror}") from None


def _complete_lines(path: str, *, repair: bool) -> list[dict]:
  """The lines of an output file. Each line is written with its newline in one write, so a
  kill can only leave a last line without one: it is dropped (and cut from the file when
  `repair`). Any other line that is not a jaxspec run output line is an error."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1  # complete lines end at the last newline
  out = []
  for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
    if not raw.strip():
      continue
    try:
      obj = json.loads(raw)
    except json.JSONDecodeError:
      obj = None
    if not isinstance(obj, dict) or "id" not in obj or "settings" not in obj:
      raise ValueError(f"{path}:{number} is not a jaxspec run output line; refusing to resume "
                       f"into {path} (use another --output)")
    out.append(obj)
  if repair and end < len(data):
    with open(path, "r+b") as f:
      f.truncate(end)
  return out


def existing(output: str, settings: dict, mine: str) -> set:
  """Ids already written (output and every part), after checking they came from `settings`.
  `mine`: the file this process appends to (its torn last line is cut)."""
  sidecar = output + SETTINGS_SUFFIX
  files = [output] + sorted(glob.glob(glob.escape(output) + PART + "*"))
  rows = [r for p in files for r in _complete_lines(p, repair=(p == mine))]
  want = settings_hash(settings)
  if rows and os.path.exists(sidecar):
    with open(sidecar) as f:
      old = json.load(f)
    diff = [k for k in settings if k != "model" and old.get(k) != settings[k]]
    if diff:
      said = ", ".join(f"{_flag(k)} {old.get(k)!r} (now {settings[k]!r})" for k in diff)
      raise ValueError(f"{output} was written with other settings: {said}; refusing to mix "
                       f"them (use another --output, or delete {output} to start over)")
  other = {r["settings"] for r in rows} - {want}
  if other:
    raise ValueError(f"{output} holds lines written with other settings (settings "
                     f"{sorted(other)[0]}, now {want}); refusing to mix them (use another "
                     f"--output, or delete {output} to start over)")
  _write_atomic(sidecar, json.dumps(settings, indent=1, sort_keys=True) + "\n")
  return {r["id"] for r in rows}


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class Appender:
  """Appends whole lines: one `os.write` of an O_APPEND descriptor per line, so a kill leaves
  at most the last line short (dropped on resume), never two lines interleaved."""

  def __init__(self, path: str):
    self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, obj: dict) -> None:
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    while data:
      data = data[os.write(self.fd, data):]

  def close(self) -> None:
    os.close(self.fd)


def merge_parts(output: str) -> None:
  """Moves every part's lines into `output` (ids already there are skipped), then removes it."""
  have = {r["id"] for r in _complete_lines(output, repair=True)}
  out = Appender(output)
  try:
    for part in sorted(glob.glob(glob.escape(output) + PART + "*")):
      for r in _complete_lines(part, repair=False):
        if r["id"] not in have:
          out.write(r)
          have.add(r["id"])
      os.remove(part)
  finally:
    out.close()


# ------------------------------------------------------------------------------------ job


def main(a, model=None, drafter=None) -> int:
  import jax

  from jaxspec import batching, sharding

  sharding.initialize()
  nproc, pid = jax.process_count(), jax.process_index()
  for name in ("batch_size", "max_new_tokens"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                       f"{getattr(a, name)}")
  check_writable(a.output)
  mine = a.output if nproc == 1 else f"{a.output}{PART}{pid}"
  check_writable(mine)
  lines, skipped = read_input(a.input, skip_bad=a.skip_bad_lines)
  mesh = local_mesh(a.local_devices)
  if model is None:
    import jaxspec
    model = jaxspec.load_model(a.model, progress=False, mesh=mesh)
  if drafter is None:
    from jaxspec.drafters import registry
    drafter = registry.parse(a.drafter, a.k, a.tree)
  if a.chat and (model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None)):
    raise ValueError(f"--chat needs a chat template, but {model.name} has none; drop --chat")
  settings = settings_of(a, model)
  tag = settings_hash(settings)
  done = existing(a.output, settings, mine)

  # Tokenize and check the context of every line (every process alike, so a bad line stops
  # them all), then keep this process's share of what is left.
  ctx = model.config.max_seq_len
  jobs, total_mine, done_mine = [], 0, 0
  for pos, line in enumerate(lines):
    item = {"id": line.id, "prompt": line.prompt}
    if line.chat or (a.chat and isinstance(line.prompt, str)):
      item = {"id": line.id, "messages": line.prompt if line.chat else
              [{"role": "user", "content": line.prompt}]}
    try:
      _, ids = batching.encode_one(model, item, pos)
    except (TypeError, ValueError) as e:
      _bad(a.input, line.number, str(e), a.skip_bad_lines, skipped)
      continue
    if len(ids) + a.max_new_tokens > ctx:
      _bad(a.input, line.number, f"prompt of {len(ids)} tokens + --max-new-tokens "
           f"{a.max_new_tokens} exceeds {model.name}'s context of {ctx} tokens",
           a.skip_bad_lines, skipped)
      continue
    if pos % nproc != pid:
      continue
    total_mine += 1
    if line.id in done:
      done_mine += 1
      continue
    jobs.append({"id": line.id, "prompt": ids})

  if jobs:
    _generate(a, model, drafter, jobs, mine, tag, total_mine, done_mine, nproc, pid, mesh)
  if nproc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxspec run: every share written")
  if pid == 0:
    merge_parts(a.output)
  if pid == 0 and skipped:
    print(f"jaxspec: {len(skipped)} input line(s) skipped: "
          f"{', '.join(map(str, skipped[:20]))}{' ...' if len(skipped) > 20 else ''}",
          file=sys.stderr)
  print(f"jaxspec: run {pid}/{nproc}: {len(jobs)} new line(s), {done_mine} already written "
        f"({a.output})", file=sys.stderr)
  return 0


def local_mesh(n: int):
  """A data-parallel mesh over this process's first n devices (-1: all); None for one."""
  import jax

  from jaxspec import sharding

  have = jax.local_device_count()
  if n == -1:
    n = have
  if not 1 <= n <= have:
    raise ValueError(f"--local-devices must be -1 or in [1, {have}], got {n}")
  return None if n == 1 else sharding.make_mesh(data=n, tensor=1,
                                                devices=jax.local_devices()[:n])


def _generate(a, model, drafter, jobs, mine, tag, total, already, nproc, pid, mesh) -> None:
  from jaxspec import batching

  show = a.progress if a.progress is not None else sys.stderr.isatty()
  bar = None
  if show:
    from tqdm import tqdm
    desc = f"run {pid}/{nproc}" if nproc > 1 else "run"
    bar = tqdm(total=total, initial=already, unit="prompt", desc=desc, file=sys.stderr)
  out = Appender(mine)
  t0, new, calls = time.perf_counter(), 0, 0
  try:
    for c in batching.generate_many(
        model, jobs, batch_size=a.batch_size, drafter=drafter, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
        max_prompt_tokens=max(len(j["prompt"]) for j in jobs), insert_size=a.insert_size,
        mesh=mesh):
      out.write({"id": c.id, "text": c.text, "tokens": c.tokens, "new_tokens": c.new_tokens,
                 "tau": round(c.tau, 4), "finish_reason": c.finish_reason,
                 "prompt_tokens": c.prompt_tokens, "settings": tag})
      new, calls = new + c.new_tokens, calls + c.target_calls
      if bar is not None:
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{new / dt:.1f} tok/s, tau {new / max(1, calls):.2f}",
                            refresh=False)
        bar.update(1)
  finally:
    out.close()
    if bar is not None:
      bar.close()
