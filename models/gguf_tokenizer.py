"""Tokenizers described by GGUF metadata, rebuilt with the `tokenizers` library.

A GGUF file carries no tokenizer.json, only llama.cpp's keys: `tokenizer.ggml.model` (the kind:
"gpt2" byte-level BPE or "llama" SentencePiece-style BPE), `tokenizer.ggml.pre` (how byte-level
text is split before merging), the token list, merges or scores, and token types. This module
turns them into the same pipeline transformers builds for the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so both give the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import bytes_to_unicode

# llama.cpp token types (`tokenizer.ggml.token_type`).
CONTROL, USER_DEFINED = 3, 4

_GPT2 = None  # GPT-2's own regex: the ByteLevel pre-tokenizer with use_regex=True
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS = "digits"  # each digit alone, then GPT-2's regex (llama.cpp's smollm/starcoder family)

# `tokenizer.ggml.pre` -> how byte-level BPE splits text (llama.cpp's and transformers' tables).
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "smollm": _DIGITS, "starcoder": _DIGITS, "refact": _DIGITS, "command-r": _DIGITS,
    "codeshell": _DIGITS, "exaone": _DIGITS, "minerva-7b": _DIGITS,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3, "pixtral": _LLAMA3, "midm-2.0": _LLAMA3, "lfm2": _LLAMA3,
    "dbrx": _LLAMA3, "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
    "tekken": _TEKKEN,
    "gpt-4o": _GPT4O, "llama4": _GPT4O, "minimax-m2": _GPT4O,
}
KINDS = ("gpt2", "llama")
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
  """SentencePiece vocabularies store scores, not merges: every split of a token into two
  tokens is a merge, best score first (transformers' `generate_merges`)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for token, score in zip(tokens, scores):
    local = [(token[:i], token[i:], score) for i in range(1, len(token))
             if token[:i] in vocab and token[i:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.extend(local)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def _byte_level(tokens, merges, pre, path):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
                     f"{', '.join(sorted(PRE_TOKENIZERS))})")
  if merges is None:
    raise ValueError(f"{path}: GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, t in enumerate(tokens):  # tokens outside the byte alphabet are spelled byte by byte
    vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                             fuse_unk=False))
  split = PRE_TOKENIZERS[pre]
  if split is _GPT2:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split is _DIGITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok, alphabet


def _sentencepiece(tokens, scores, arch, unk, path):
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

  if arch in _GEMMA_ARCHS:
    # Gemma stores runs of spaces as spaces (not "▁"), and its merge order is the file order.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    scores = [-i for i in range(len(tokens))]
  elif scores is None:
    raise ValueError(f"{path}: GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
  vocab = {t: i for i, t in enumerate(tokens)}
  bpe = dict(vocab=vocab, merges=_merges_from_scores(tokens, scores), fuse_unk=True,
             byte_fallback=True)
  if arch in _GEMMA_ARCHS:
    tok = Tokenizer(models.BPE(**bpe, unk_token=unk))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
  else:  # Llama 2 style: a "▁" before the first word, stripped again when decoding
    tok = Tokenizer(models.BPE(**bpe))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  return tok, None


def build(*, kind: str | None, pre: str | None, arch: str, tokens: Sequence[str],
          merges: Sequence[str] | None, scores: Sequence[float] | None,
          token_types: Sequence[int] | None, unk_id: int | None = None, path: str = ""):
  """The `tokenizers.Tokenizer` of a GGUF vocabulary, and {special token: id}."""
  from tokenizers import AddedToken

  if kind == "gpt2":
    tok, alphabet = _byte_level(tokens, merges, pre or "default", path)
  elif kind == "llama":
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    tok, alphabet = _sentencepiece(tokens, scores, arch, unk, path)
  else:
    raise ValueError(f"{path}: GGUF tokenizer {kind!r} is not supported (supported: gpt2 "
                     f"byte-level BPE, llama SentencePiece)")
  types = list(token_types) if token_types is not None else [1] * len(tokens)
  # Control tokens stay whole (and special); in a byte-level vocabulary one spelled outside the
  # byte alphabet is a llama.cpp mislabel, skipped as transformers does.
  specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
              if ty == CONTROL and (alphabet is None or set(t) <= alphabet)}
  if specials:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  vocab = tok.get_vocab()
  user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
  if user:  # matched whole in the text, like `<think>`, but not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
  return tok, specials
