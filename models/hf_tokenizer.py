"""Tokenizer files of a Hugging Face checkpoint directory: `tokenizer.json` plus the
special-token metadata and chat template spread over the config files."""

from __future__ import annotations

import os
from typing import Any

from .hf_config import optional_json
from .tokenizer import HFTokenizer


def _token_text(t) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
  if isinstance(t, dict):
    return t.get("content")
  return t if isinstance(t, str) else None


def _ids(x) -> list[int]:
  if x is None:
    return []
  return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _chat_template(folder: str, tcfg: dict[str, Any]) -> str | None:
  t = tcfg.get("chat_template")
  if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    t = named.get("default") or next(iter(named.values()), None)
  if t:
    return t
  jinja = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  return optional_json(folder, "chat_template.json").get("chat_template")


def load_tokenizer(folder: str, cfg: dict[str, Any] | None = None) -> HFTokenizer | None:
  """`tokenizer.json` plus special-token metadata; None when the folder has no tokenizer.json.

  EOS ids are the union of generation_config.json, config.json and tokenizer_config.json
  (generation stops on any of them, as `transformers.generate` does for lists). Chat templates
  see `bos_token` / `eos_token` only as tokenizer_config.json names them, as in transformers.
  """
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    return None
  from tokenizers import Tokenizer

  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:
    raise ValueError(f"{path}: cannot read tokenizer ({e})") from e
  cfg = cfg if cfg is not None else optional_json(folder, "config.json")
  tcfg = optional_json(folder, "tokenizer_config.json")
  gen = optional_json(folder, "generation_config.json")

  bos_token = _token_text(tcfg.get("bos_token"))
  bos_id = tok.token_to_id(bos_token) if bos_token else None
  if bos_id is None:
    ids = _ids(gen.get("bos_token_id")) or _ids(cfg.get("bos_token_id"))
    bos_id = ids[0] if ids else None
  eos_token = _token_text(tcfg.get("eos_token"))
  eos = _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
  if eos_token and tok.token_to_id(eos_token) is not None:
    eos.append(tok.token_to_id(eos_token))
  eos = list(dict.fromkeys(eos))

  if "add_bos_token" in tcfg:
    add_bos = bool(tcfg["add_bos_token"])
  else:  # e.g. Llama 3: the tokenizer.json post-processor prepends BOS
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
  specials = {t.content: int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
  return HFTokenizer(tok, bos_id=bos_id, eos_ids=eos, add_bos=add_bos,
                     chat_template=_chat_template(folder, tcfg), special_tokens=specials,
                     bos_token=bos_token, eos_token=eos_token)
