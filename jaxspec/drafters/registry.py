"""Drafter families by name: what the command line, `jaxspec bench` and the perf tools use.

Each family registers itself once, in its own file, with a decorator on its user-facing class:

    @registry.register("ngram", usage="ngram[:N]", help="prompt lookup over the row's context")
    @dataclasses.dataclass(frozen=True)
    class NGram(Drafter):
      ...
      @classmethod
      def from_cli(cls, arg: str, k: int, tree: int | None) -> "NGram": ...

`from_cli` builds the drafter from the text after the colon (`ngram:3` -> "3"), the draft
length `--k` and the `--tree` node budget (None: a chain). An optional `bench_defaults(config)`
classmethod names the specs `jaxspec bench` runs for this family when `--drafters` is not
given. Nothing else in jaxspec needs to know the family exists.
"""

from __future__ import annotations

import dataclasses
import os

# Typical acceptance rates of a drafter's rank-r candidate (rank 0 = its top guess), used to
# shape static trees from a node budget (best-first, see trees.Static.from_acceptance).
RANK_ACCEPTANCE = (0.6, 0.15, 0.08, 0.05)
DEFAULT_K = 4  # --k when not given


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str  # the command-line name: `--drafter NAME[:ARG]`
  cls: type  # the user-facing Drafter class
  usage: str  # e.g. "early-exit:L"
  help: str
  aliases: tuple[str, ...] = ()

  @property
  def chains(self) -> bool:
    """Whether the family drafts chains (False: it always drafts a tree)."""
    return self.cls.drafts_chains

  @property
  def trees(self) -> bool:
    return bool(self.cls.tree_kinds)

  def build(self, arg: str, k: int | None, tree: int | None):
    """k None: --k was not given (DEFAULT_K for families that draft k tokens)."""
    if k is not None and not self.cls.uses_k:
      raise ValueError(f"--k has no effect with --drafter {self.name}: its tree sets how deep "
                       f"it drafts (--tree N sets the node budget); drop --k")
    return self.cls.from_cli(arg, DEFAULT_K if k is None else k, tree)

  def bench_defaults(self, config) -> list[str]:
    return list(self.cls.bench_defaults(config))


_ENTRIES: dict[str, Entry] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, usage: str | None = None, help: str = "",
             aliases: tuple[str, ...] = ()):
  """Class decorator: registers a Drafter subclass under `name` (and `aliases`)."""

  def wrap(cls):
    if not callable(getattr(cls, "from_cli", None)):
      raise TypeError(f"{cls.__name__} needs a classmethod from_cli(arg, k, tree) to be "
                      f"registered")
    for n in (name, *aliases):
      owner = _ALIASES.get(n)
      if owner is not None and _ENTRIES[owner].cls.__qualname__ != cls.__qualname__:
        raise ValueError(f"drafter name {n!r} is already registered by "
                         f"{_ENTRIES[owner].cls.__name__}")
    _ENTRIES[name] = Entry(name=name, cls=cls, usage=usage or name, help=help,
                           aliases=tuple(aliases))
    for n in (name, *aliases):
      _ALIASES[n] = name
    return cls

  return wrap


def unregister(name: str) -> None:
  entry = _ENTRIES.pop(name)
  for n in (entry.name, *entry.aliases):
    _ALIASES.pop(n, None)


def entries() -> list[Entry]:
  return list(_ENTRIES.values())


def get(name: str, spec: str | None = None) -> Entry:
  if name not in _ALIASES:
    raise ValueError(f"unknown drafter {spec or name!r} ({usage()})")
  return _ENTRIES[_ALIASES[name]]


def split(text: str) -> list[str]:
  """A comma-separated list of drafter specs (`--drafters`), where a spec's own argument may
  hold commas too (`layer-skip:0,2,ngram` is ['layer-skip:0,2', 'ngram']): a piece that does
  not start with a registered name continues the spec before it."""
  out: list[str] = []
  for piece in text.split(","):
    name = piece.partition(":")[0]
    if out and name != "none" and name not in _ALIASES:
      out[-1] += "," + piece
    else:
      out.append(piece)
  return out


def usage() -> str:
  return ", ".join(["none"] + [e.usage for e in _ENTRIES.values()])


def parse(spec: str | None, k: int | None = None, tree: int | None = None):
  """'ngram[:N]' | 'early-exit:L' | 'draft:SRC' | ... -> a drafter (None for 'none').
  k: --k (None: not given); tree: the --tree node budget (None: a chain)."""
  if tree is not None:
    check_budget(tree)
  if spec is None or spec == "none":
    if tree is not None:
      raise ValueError(f"--tree {tree} has no effect without a drafter; pass --drafter too "
                       f"(e.g. --drafter ngram --tree {tree})")
    return None
  name, _, arg = spec.partition(":")
  return get(name, spec).build(arg, k, tree)


def check_budget(tree) -> int:
  """A --tree node budget: an int >= 2 (the pending token and at least one draft)."""
  if isinstance(tree, bool) or not isinstance(tree, int) or tree < 2:
    raise ValueError(f"--tree must be a node budget of at least 2 (the pending token and one "
                     f"draft), got {tree}")
  return tree


def bench_defaults(config) -> list[str]:
  """The drafter specs `jaxspec bench` runs when `--drafters` is not given."""
  return [s for e in _ENTRIES.values() for s in e.bench_defaults(config)]


def methods(specs: list[str], k: int, tree: int | None) -> list[tuple[str, object]]:
  """(label, drafter) benchmark rows for drafter specs: each family's chain and, given a node
  budget (or for families that only draft trees), its tree. 'none' is skipped."""
  out = []
  for spec in specs:
    if spec == "none":
      continue
    name, colon, arg = spec.partition(":")
    entry = get(name, spec)
    kk = k if entry.cls.uses_k else None  # the same --k for every family that takes one
    label = f"{name}:{os.path.basename(arg)}" if "/" in arg else spec  # paths by file name
    if entry.chains:
      out.append((f"{label} k={k}", parse(spec, kk)))
    if (tree and entry.trees) or not entry.chains:
      d = parse(spec, kk, tree)
      out.append((f"{label} tree={d.tree.n_nodes}", d))
  return out


# ------------------------------------------------------------- helpers for from_cli methods


def int_arg(what: str, arg: str, example: str) -> int:
  try:
    return int(arg)
  except ValueError:
    raise ValueError(f"--drafter {what} needs an integer, got {arg!r} (e.g. {example})") from None


def static_tree(nodes: int | None, k: int, acceptance: bool = False):
  """A --tree node budget -> a Static template (model-free drafters need a fixed topology):
  one chain of k per n-gram match, or (acceptance=True) the best tree under typical per-rank
  acceptance rates."""
  from jaxspec import trees

  if nodes is None or not isinstance(nodes, int):
    return nodes
  check_budget(nodes)
  if not acceptance and nodes - 1 < k:
    raise ValueError(f"--tree {nodes}: it holds no chain of --k {k} drafts; give --tree {k + 1} "
                     f"or more, or a smaller --k")
  try:
    if acceptance:
      return trees.Static.from_acceptance(RANK_ACCEPTANCE, nodes=nodes)
    return trees.Static.chains((nodes - 1) // k, k)
  except ValueError as e:
    raise ValueError(f"--tree {nodes}: {e}") from None


def dynamic_tree(nodes: int | None, k: int):
  """A --tree node budget -> an EAGLE-2 dynamic tree as deep as the draft length k (beam 4)."""
  from jaxspec import trees

  if nodes is None or not isinstance(nodes, int):
    return nodes
  check_budget(nodes)
  try:
    return trees.Dynamic(nodes=nodes, topk=4, depth=k)
  except ValueError as e:
    raise ValueError(f"--tree {nodes} with --k {k}: {e}") from None
