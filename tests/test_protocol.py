"""The drafter protocol: a new family is one file (here: this test file), and the package's
imports only run downward.

`Successor` below is defined outside the package: it proposes, after each token, the token a
fixed table says follows it (rank r of a [V, M] table for the r-th sibling of a tree). It is
registered once and then works through `generate`, `stream`, `jaxspec bench --drafters` and
token trees, with greedy output equal to plain decoding.
"""

import ast
import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import cli, drafters, trees
from jaxspec.drafters import registry
from jaxspec.drafters.base import Drafter, DrafterSpec, Proposal, Round, last_tokens

PROMPTS = ["Once upon a time", "The little bird", "One day, Lily"]
N_NEW = 40


# ---------------------------------------------------------------- a drafter defined out here


@dataclasses.dataclass(frozen=True)
class SuccessorSpec(DrafterSpec):
  def propose(self, table, dstate, r: Round):
    pending = last_tokens(r.seq, r.n, 1)[:, 0]  # [B]
    if self.tree is None:
      toks, cur = [], pending
      for _ in range(self.k):
        cur = table[cur, 0]
        toks.append(cur)
      return dstate, Proposal.chain(jnp.stack(toks, axis=1))
    tree = self.tree
    parents, ranks = np.asarray(tree.parents), np.asarray(tree.ranks)
    cols = [pending[:, None]]
    for d in range(1, tree.max_depth + 1):
      s, e = tree.levels[d]
      known = jnp.concatenate(cols, axis=1)
      cols.append(table[known[:, parents[s:e]], jnp.asarray(ranks[s:e])[None, :]])
    return dstate, Proposal.from_tree(tree, tree.arrays(jnp.concatenate(cols, axis=1)))


@dataclasses.dataclass(frozen=True, eq=False)
class Successor(Drafter):
  """table: [V, M] int array, table[t, r] = the r-th guess for the token after t."""

  table: object = None
  k: int = 4
  tree: object = None

  tree_kinds = (trees.Static,)

  def check(self):
    if self.table is None:
      raise ValueError("Successor needs a table")

  def bind(self, target):
    return SuccessorSpec(k=self.k, target=target.config, tree=self.tree), jnp.asarray(self.table)

  @classmethod
  def from_cli(cls, arg, k, tree):
    return cls(table=TABLE["table"], k=k, tree=registry.static_tree(tree, k))


TABLE = {}  # filled by the fixture below, read by Successor.from_cli


@pytest.fixture(scope="module")
def successor(stories):
  """A [V, 2] table from the target's own greedy continuations (rank 0) and noise (rank 1)."""
  plain = jaxspec.generate(stories, PROMPTS, max_new_tokens=N_NEW, stop_tokens=())
  v = stories.config.vocab_size
  table = np.stack([np.arange(v), (np.arange(v) * 7 + 3) % v], axis=1).astype(np.int32)
  for p, out in zip(PROMPTS, plain.tokens):
    seq = stories.tokenizer.encode(p) + out
    for a, b in zip(seq, seq[1:]):
      table[a, 0] = b
  TABLE["table"] = table
  registry.register("successor", usage="successor", help="next token from a fixed table")(
      Successor)
  yield plain
  registry.unregister("successor")


def test_new_drafter_through_generate_and_tree(stories, successor):
  chain = jaxspec.generate(stories, PROMPTS, drafter=Successor(TABLE["table"], k=4),
                           max_new_tokens=N_NEW, stop_tokens=())
  assert chain.tokens == successor.tokens
  assert chain.stats.mean_accepted > 1.5  # the table holds the target's own continuations
  tree = jaxspec.generate(stories, PROMPTS,
                          drafter=Successor(TABLE["table"], tree=trees.Static.from_branching(
                              (2, 2, 1))), max_new_tokens=N_NEW, stop_tokens=())
  assert tree.tokens == successor.tokens
  assert tree.stats.mean_accepted > 1.5
  with pytest.raises(ValueError, match="Static"):
    Successor(TABLE["table"], tree=trees.Dynamic(nodes=8, topk=2, depth=3))


def test_new_drafter_through_stream(stories, successor):
  pieces = list(jaxspec.stream(stories, PROMPTS[0], drafter=Successor(TABLE["table"], k=3),
                               max_new_tokens=N_NEW, stop_tokens=()))
  assert "".join(pieces) == stories.tokenizer.decode(
      stories.tokenizer.encode(PROMPTS[0]) + successor.tokens[0])[len(PROMPTS[0]):]


def test_new_drafter_through_cli_and_bench(stories, successor, tmp_path, capsys):
  assert registry.parse("successor", k=2).k == 2
  assert "successor" in registry.usage()
  out = tmp_path / "bench.md"
  rc = cli.main(["bench", "--drafters", "successor", "--tree", "7", "--limit", "1",
                 "--categories", "qa", "--max-new-tokens", "8", "--out", str(out)])
  assert rc == 0  # bench returns 1 when any output differs from plain
  text = out.read_text()
  assert "successor k=4" in text and "successor tree=" in text


def test_every_hook_has_a_default():
  """The engine calls init / propose / commit on every spec; only propose is required."""
  spec = drafters.NoDraft(k=0, target=jaxspec.load_model("stories260K").config)
  assert spec.init(None, None) == ()
  assert spec.commit(None, "state", None, None) == "state"
  with pytest.raises(NotImplementedError):
    DrafterSpec(k=1, target=spec.target).propose(None, None, None)
  with pytest.raises(TypeError, match="drafter"):
    jaxspec.generate(jaxspec.load_model("stories260K"), ["a"], drafter=object())
  # the user-facing half: class hooks the registry reads, each with a default
  assert Drafter.drafts_chains and Drafter.uses_k and Drafter.bench_defaults(spec.target) == []


def test_oracle_refuses_trees():
  with pytest.raises(ValueError, match="chains only"):
    drafters.Oracle([[1, 2, 3]], k=2, tree=trees.Static.from_branching((2,)))


def test_common_options_are_checked_once():
  for cls in (drafters.NGram, drafters.EarlyExit):
    for bad in (0, 65, True, 2.0):
      with pytest.raises(ValueError, match="k must be"):
        cls(k=bad)
    assert cls(k=np.int64(3)).k == 3 and type(cls(k=np.int64(3)).k) is int
  with pytest.raises(TypeError, match="NGram n"):
    drafters.NGram(n=True)
  with pytest.raises(TypeError, match="EarlyExit layers"):
    drafters.EarlyExit(layers=True)
  with pytest.raises(ValueError, match="stop_below"):
    drafters.EarlyExit(layers=2, stop_below=1.5)


# ------------------------------------------------------------------------------ import graph

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"jaxspec": ROOT / "jaxspec", "jaxspec.models": ROOT / "models",
            "jaxspec.sharding": ROOT / "sharding"}


def _modules() -> dict:
  """{module name: path} for every module of the three source trees."""
  out = {}
  for pkg, folder in PACKAGES.items():
    for path in folder.rglob("*.py"):
      rel = path.relative_to(folder).with_suffix("")
      parts = [p for p in rel.parts if p != "__init__"]
      name = ".".join([pkg, *parts]) if parts else pkg
      if pkg == "jaxspec" and parts and parts[0] in ("models", "sharding"):
        continue
      out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: dict):
  """(imported module, imported names, line) for every import in the file, relative ones
  resolved; modules outside the package are dropped."""
  tree = ast.parse(path.read_text())
  is_pkg = path.name == "__init__.py"
  base = name.split(".") if is_pkg else name.split(".")[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in modules:
          yield a.name, [], node.lineno
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      names = [a.name for a in node.names]
      subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
      rest = [n for n in names if f"{mod}.{n}" not in modules]
      if mod in modules and rest:  # `from pkg import submodule` is an edge to the submodule
        yield mod, rest, node.lineno
      for s in subs:
        yield s, [], node.lineno


def test_no_import_cycles_and_no_private_imports():
  modules = _modules()
  graph = {m: set() for m in modules}
  problems = []
  for name, path in modules.items():
    for mod, names, line in _imports(name, path, modules):
      if mod != name:
        graph[name].add(mod)
      for n in names:
        if n.startswith("_") and not n.startswith("__") and mod != name:
          problems.append(f"{path.relative_to(ROOT)}:{line} imports private {mod}.{n}")
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        problems.append("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not problems, "\n".join(problems)


def test_tests_import_no_private_names():
  bad = []
  for path in (ROOT / "tests").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxspec"):
        bad += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")]
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in ("jaxspec", "api", "engine", "adaptive", "session", "bench",
                                "perf", "peers", "cli", "drafters", "verify", "trees")):
        bad.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
  assert not bad, bad
