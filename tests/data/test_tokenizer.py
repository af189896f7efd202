"""Tokenizers, make_tokenizer's checks and unigram_entropy."""

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

from dsjax.data import ByteTokenizer, HFTokenizer, make_tokenizer, unigram_entropy

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world", "data", "pipeline"]


def write_word_tokenizer(directory, words=WORDS, config=None) -> str:
  """A WordLevel tokenizer.json (whitespace-split words) in `directory`; returns its path."""
  tok = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([w for w in words if w.startswith("<")])
  path = str(directory / "tokenizer.json")
  tok.save(path)
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return path


def test_byte_round_trip_and_replacement():
  tok = ByteTokenizer()
  text = "héllo, wörld ✓"
  ids = tok.encode(text)
  assert tok.vocab_size == 256 and tok.bos_id is None and tok.eos_id is None
  assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
  assert [a.tolist() for a in tok.encode_batch([text, "x"])] == [ids, [ord("x")]]
  assert tok.decode(ids[:2]) == "h\ufffd"  # a split character decodes, replaced


def test_hf_round_trip_and_specials(tmp_path):
  tok = make_tokenizer(write_word_tokenizer(tmp_path), model_vocab_size=7)
  assert isinstance(tok, HFTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (7, 1, 2)
  ids = tok.encode("hello data pipeline world")
  assert ids == [3, 5, 6, 4]  # no bos/eos: the pipeline adds them per document
  assert tok.decode(ids) == "hello data pipeline world"
  assert [a.tolist() for a in tok.encode_batch(["world", "hello hello"])] == [[4], [3, 3]]
  assert make_tokenizer(str(tmp_path), model_vocab_size=8).vocab_size == 7  # a directory


def test_hf_specials_from_config_or_absent(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  configured = HFTokenizer(write_word_tokenizer(
      tmp_path / "a", config={"bos_token": {"content": "data"}, "eos_token": "pipeline"}))
  assert (configured.bos_id, configured.eos_id) == (5, 6)
  plain = HFTokenizer(write_word_tokenizer(tmp_path / "b", words=["[UNK]", "a", "b"]))
  assert plain.bos_id is None and plain.eos_id is None


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.json.*--config\.data\.tokenizer"):
    make_tokenizer(str(tmp_path / "nope.json"), model_vocab_size=100)


def test_corrupt_tokenizer_file(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer\.json.*--config\.data\.tokenizer"):
    make_tokenizer(str(bad), model_vocab_size=100)


@pytest.mark.parametrize("spec", ["byte", "hf"])
def test_tokenizer_vocab_larger_than_model(tmp_path, spec):
  path = "byte" if spec == "byte" else write_word_tokenizer(tmp_path)
  size = 256 if spec == "byte" else 7
  with pytest.raises(ValueError, match=rf"{size} tokens.*vocab_size is 5.*"
                                       rf"--config\.model\.vocab_size >= {size}"):
    make_tokenizer(path, model_vocab_size=5)


def test_unigram_entropy_by_hand():
  # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
  assert unigram_entropy(np.array([7, 7, 3, 0], np.int32)) == pytest.approx(1.5 * math.log(2))
  assert unigram_entropy([5, 5, 5]) == 0.0
  uniform = np.arange(256).repeat(3)
  assert unigram_entropy(uniform) == pytest.approx(math.log(256))
  with pytest.raises(ValueError, match="non-empty"):
    unigram_entropy([])
  with pytest.raises(ValueError, match="non-negative"):
    unigram_entropy([1, -1])
