"""Pure functional Llama / Gemma-family decoders (installed as `jaxspec.models`)."""

from .cache import KVCache
from .config import ModelConfig, RopeScaling
from .llama import Output, forward, head, init_params, param_shapes
from . import layout
from .load import load
from .model import Model
from .tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "KVCache", "Model", "ModelConfig", "Output", "RopeScaling",
    "SentencePieceTokenizer", "Tokenizer", "forward", "head", "init_params", "layout", "load",
    "param_shapes",
]
