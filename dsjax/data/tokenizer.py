"""Tokenizers: UTF-8 bytes (no vocabulary file) or a HuggingFace `tokenizer.json`."""

from __future__ import annotations

import abc
import json
import os
from typing import Sequence

import numpy as np

# Special-token spellings of common model families, most specific first. DeepSeek's use
# U+FF5C (fullwidth vertical bar) and U+2581 (lower one eighth block).
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<|begin▁of▁sentence|>",
              "<|startoftext|>", "<s>", "<bos>", "[BOS]")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|end▁of▁sentence|>",
              "<|endoftext|>", "</s>", "<eos>", "[EOS]")

_TOKENIZER_ADVICE = ("set --config.data.tokenizer to 'byte' or to the path of a HuggingFace "
                     "tokenizer.json")


class Tokenizer(abc.ABC):
  """Text <-> token ids. `bos_id` / `eos_id` are None when the vocabulary has no such token;
  the pipeline adds them around every document when present."""

  vocab_size: int
  bos_id: int | None = None
  eos_id: int | None = None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids` (special tokens kept, invalid byte sequences replaced)."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text as a 1-D int32 array; subclasses override it with a faster
    batched path."""
    return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]

  @property
  def name(self) -> str:
    """Short description for logs and error messages."""
    return type(self).__name__


class ByteTokenizer(Tokenizer):
  """Each UTF-8 byte is one token: vocab 256, no special tokens, nothing to download."""

  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    # A chunk boundary can split a multi-byte character; replace rather than raise.
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

  @property
  def name(self) -> str:
    return "byte"


def _config_special_token(path: str, key: str) -> str | None:
  """`key` ("bos_token"/"eos_token") of the tokenizer_config.json beside `path`, if any."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return None
  try:
    with open(config_path, encoding="utf-8") as f:
      value = json.load(f).get(key)
  except (OSError, ValueError, AttributeError):
    return None  # an unreadable side file only loses the hint; tokenizer.json still loads
  if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizers` tokenizer.json. bos/eos come from a tokenizer_config.json
  next to it when there is one, else from common special-token spellings in the vocab."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path = os.fspath(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f"Could not load {self.path!r} as a HuggingFace tokenizer.json ({e}); "
                       f"{_TOKENIZER_ADVICE}.") from e
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._find_special("bos_token", _BOS_NAMES)
    self.eos_id = self._find_special("eos_token", _EOS_NAMES)

  def _find_special(self, config_key: str, names: Sequence[str]) -> int | None:
    configured = _config_special_token(self.path, config_key)
    for name in ((configured,) if configured else ()) + tuple(names):
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return int(token_id)
    return None

  def encode(self, text: str) -> list[int]:
    # add_special_tokens=False: the pipeline adds bos/eos itself, once per document, instead
    # of the post-processor adding them to every call.
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  @property
  def name(self) -> str:
    return self.path


def make_tokenizer(spec: str, model_vocab_size: int) -> Tokenizer:
  """The tokenizer named by `spec`: "byte", a tokenizer.json path, or a directory holding a
  tokenizer.json. Raises if its vocabulary does not fit the model's `model_vocab_size`."""
  spec = os.fspath(spec)
  if spec.lower() == "byte":
    tok = ByteTokenizer()
  else:
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Tokenizer file {path!r} does not exist; {_TOKENIZER_ADVICE}.")
    tok = HFTokenizer(path)
  if tok.vocab_size > model_vocab_size:
    raise ValueError(
        f"Tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model's vocab_size is "
        f"{model_vocab_size}; set --config.model.vocab_size >= {tok.vocab_size} or use "
        "another tokenizer (--config.data.tokenizer).")
  return tok
