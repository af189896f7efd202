"""The training data pipeline: documents -> tokens -> chunks -> packed rows -> Grain batches.

  tok = make_tokenizer(cfg.data.tokenizer, model_vocab_size=cfg.model.vocab_size)
  data = build_data(cfg.data, tok, seq_len=T, batch_size=B, seed=cfg.seed, vocab_size=V)
  it = data.train_iterator()        # infinite; next(it) -> dict of [B, T] arrays
  state = it.get_state()            # JSON-serialisable; it.set_state(state) resumes exactly
  evals = data.eval_batches(4)      # deterministic held-out batches

All tokenization happens at construction (so data errors surface before training starts);
batches are then assembled by index from a packing table (see packing.py) through a Grain
MapDataset, shuffled per epoch by seed, strided by process for multi-host training, and
optionally built in Grain worker processes (identical output for any worker count).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import grain
import numpy as np

from dsjax.data.packing import PackedRows, batch_builder, chunk_documents
from dsjax.data.recall import RecallData, build_recall_data, is_recall_source
from dsjax.data.sources import Document, load_documents
from dsjax.data.tokenizer import Tokenizer

# The held-out documents must not move with cfg.seed, so that eval losses of runs with
# different seeds are comparable.
_EVAL_SPLIT_SEED = 20240501
_MAX_SAMPLE_TOKENS = 2_000_000
_ENCODE_BLOCK = 4096  # documents per tokenizer call: bounds the peak of Python-side lists
_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)  # Grain's default: 500
_DATA_KEYS = ("source", "tokenizer", "text_field", "eval_fraction", "num_workers", "shuffle")


@dataclasses.dataclass(frozen=True)
class _Corpus:
  tokens: np.ndarray   # [N] int32, every document (bos/eos included) concatenated
  offsets: np.ndarray  # [D + 1] int64 document boundaries


def _check_ids(ids: np.ndarray, vocab_size: int, where: str, origin: str) -> None:
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    token = int(ids[bad[0]])
    raise ValueError(
        f"Token id {token} from {where} ({origin}) is outside the model's vocabulary "
        f"[0, {vocab_size}); set --config.model.vocab_size > {max(token, 0)} or fix the "
        "data / --config.data.tokenizer.")


def _tokenize(docs: list[Document], tok: Tokenizer, vocab_size: int) -> _Corpus:
  """Tokenizes and validates every document; bos/eos wrap each text document."""
  pieces: list[np.ndarray | None] = [None] * len(docs)
  text_docs = [i for i, d in enumerate(docs) if d.text is not None]
  for i, d in enumerate(docs):
    if d.tokens is not None:
      _check_ids(d.tokens, vocab_size, d.where, "pre-tokenized \"tokens\" field")
      pieces[i] = d.tokens.astype(np.int32)
  bos = np.asarray([tok.bos_id] if tok.bos_id is not None else [], np.int32)
  eos = np.asarray([tok.eos_id] if tok.eos_id is not None else [], np.int32)
  for first in range(0, len(text_docs), _ENCODE_BLOCK):
    block = text_docs[first:first + _ENCODE_BLOCK]
    for i, ids in zip(block, tok.encode_batch([docs[i].text for i in block])):
      pieces[i] = np.concatenate([bos, ids, eos]) if bos.size or eos.size else ids
  offsets = np.zeros(len(docs) + 1, np.int64)
  offsets[1:] = np.cumsum([len(p) for p in pieces])
  tokens = np.concatenate(pieces).astype(np.int32, copy=False)
  bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
  if bad.size:  # only tokenizer output can be left: name the document it came from
    doc = docs[int(np.searchsorted(offsets, bad[0], side="right")) - 1]
    _check_ids(tokens[bad[:1]], vocab_size, doc.where, f"produced by tokenizer {tok.name!r}")
  return _Corpus(tokens, offsets)


def _eval_chunk_mask(chunk_doc: np.ndarray, eval_fraction: float) -> np.ndarray:
  """[C] bool: the held-out chunks. Whole documents when there are >= 2 of them (at least
  one, never all); else the last eval_fraction of the single document's chunks."""
  mask = np.zeros(len(chunk_doc), bool)
  if eval_fraction <= 0:
    return mask
  docs = np.unique(chunk_doc)  # documents that gave chunks
  if len(docs) >= 2:
    count = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
    held = np.random.default_rng(_EVAL_SPLIT_SEED).permutation(docs)[:count]
    return np.isin(chunk_doc, held)
  count = min(len(chunk_doc) - 1, max(1, round(eval_fraction * len(chunk_doc))))
  if count > 0:
    mask[len(chunk_doc) - count:] = True
  return mask


def _data_settings(cfg: Any) -> dict[str, Any]:
  given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  unknown = sorted(set(given) - set(_DATA_KEYS))
  missing = sorted(set(_DATA_KEYS) - set(given))
  if unknown or missing:
    raise ValueError(f"Data config keys: unknown {unknown}, missing {missing}; the data "
                     f"section must have exactly {list(_DATA_KEYS)}.")
  frac = float(given["eval_fraction"])
  if not 0 <= frac < 1:
    raise ValueError(f"data.eval_fraction is {frac}; set --config.data.eval_fraction in "
                     "[0, 1).")
  if int(given["num_workers"]) < 0:
    raise ValueError(f"data.num_workers is {given['num_workers']}; set "
                     "--config.data.num_workers >= 0 (0 loads in the main process).")
  return given


def _check_shapes(seq_len: int, batch_size: int, process_index: int, process_count: int):
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: both must be >= 1; set "
                     "--config.train.seq_len / --config.train.batch_size.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} with process_count={process_count}: "
                     "pass jax.process_index() and jax.process_count().")


def _mark_absl_flags_parsed() -> None:
  # Grain's worker processes read an absl flag; outside absl.app.run (tests, notebooks)
  # nothing has parsed flags, and reading one would raise UnparsedFlagAccessError.
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _close(holder: list) -> None:
  """Closes and drops the Grain iterator in `holder`, so it is freed now, not at shutdown."""
  while holder:
    grain_iter = holder.pop()
    if hasattr(grain_iter, "close"):
      grain_iter.close()


class TrainIterator:
  """Infinite iterator of training batches with exact, JSON-serialisable checkpoint state.

  The state is the number of batches consumed (plus settings that must match on restore);
  restoring opens the Grain pipeline at that batch index, so it does not depend on the
  worker count, and a run may resume with a different data.num_workers.
  """

  def __init__(self, data: "DataPipeline"):
    self._data = data
    self._next_batch = 0
    # [grain iterator] once opened: lazily, so set_state before the first batch starts no
    # workers; a list, so the exit-time finalizer can drop the last reference to it.
    self._holder: list = []
    self._closer = None

  def __iter__(self) -> "TrainIterator":
    return self

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._holder:
      grain_iter = self._data._open_train(self._next_batch)  # pylint: disable=protected-access
      self._holder.append(grain_iter)
      # Grain's own cleanup at garbage collection fails (and leaks shared memory) when it
      # runs during interpreter shutdown; a finalizer closes it before that, at exit.
      self._closer = weakref.finalize(self, _close, self._holder)
    batch = next(self._holder[0])
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """{"next_batch": k, ...settings}; only ints and bools, so json.dumps works."""
    return {"next_batch": self._next_batch, **self._data.fingerprint()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at the state's batch; raises ValueError if it came from another pipeline."""
    if not isinstance(state, dict) or "next_batch" not in state:
      raise ValueError(f"{state!r:.80} is not a dsjax data iterator state; pass a dict "
                       "returned by TrainIterator.get_state().")
    mine = self._data.fingerprint()
    diff = [f"{k} {state.get(k)!r} (state) vs {v!r} (now)" for k, v in mine.items()
            if state.get(k) != v]
    if diff:
      raise ValueError(f"Data iterator state is from a different pipeline: {', '.join(diff)}; "
                       "restore with the same data settings, or start a fresh iterator.")
    self.close()
    self._next_batch = int(state["next_batch"])

  def close(self) -> None:
    """Stops Grain's prefetch threads / worker processes (also done on garbage collection
    and at interpreter exit)."""
    if self._closer is not None:
      self._closer()
    self._closer = None


class DataPipeline:
  """Train/eval split of one tokenized corpus; see `build_data`."""

  def __init__(self, cfg: dict[str, Any], tok: Tokenizer, corpus: _Corpus, *, seq_len: int,
               batch_size: int, seed: int, process_index: int, process_count: int):
    self.tokenizer, self.seq_len, self.batch_size = tok, seq_len, batch_size
    self.seed, self.shuffle = int(seed), bool(cfg["shuffle"])
    self.num_workers = int(cfg["num_workers"])
    self.process_index, self.process_count = process_index, process_count
    starts, lengths = chunk_documents(corpus.offsets, seq_len)
    if not len(starts):
      raise ValueError(f"Data source {cfg['source']!r} gave no document of >= 2 tokens; "
                       "add text or set --config.data.source to another corpus.")
    chunk_doc = np.searchsorted(corpus.offsets, starts, side="right") - 1
    held = _eval_chunk_mask(chunk_doc, float(cfg["eval_fraction"]))
    train = np.flatnonzero(~held)
    if self.shuffle:  # the packing plan (which chunks share a row) also follows the seed
      train = np.random.default_rng([self.seed % 2**32, 1]).permutation(train)
    self.train_rows = PackedRows.build(corpus.tokens, starts[train], lengths[train], seq_len)
    held_idx = np.flatnonzero(held)
    self.eval_rows = PackedRows.build(corpus.tokens, starts[held_idx], lengths[held_idx],
                                      seq_len)
    self.num_train_docs = len(np.unique(chunk_doc[train]))
    self.num_eval_docs = len(np.unique(chunk_doc[held_idx]))
    self._train_ds = self._train_dataset()

  @property
  def num_train_tokens(self) -> int:
    """Target (loss-bearing) tokens of one epoch of the train split, all processes."""
    return self.train_rows.num_targets

  @property
  def num_eval_tokens(self) -> int:
    """Target tokens of the held-out split, all processes."""
    return self.eval_rows.num_targets

  @property
  def train_batches_per_epoch(self) -> float:
    """Per-process batches in one pass over the train split."""
    return self.train_rows.num_rows / (self.batch_size * self.process_count)

  def fingerprint(self) -> dict[str, Any]:
    """The settings a saved iterator state is only valid under."""
    return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "shuffle": self.shuffle, "train_rows": self.train_rows.num_rows,
            "process_index": self.process_index, "process_count": self.process_count}

  def _train_dataset(self) -> grain.MapDataset:
    ds = grain.MapDataset.range(self.train_rows.num_rows)
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed % 2**32)
    # repeat() after shuffle() reshuffles every epoch; striding the infinite global row
    # stream gives each process a disjoint share, and batches may span epochs.
    ds = ds.repeat()[self.process_index::self.process_count]
    ds = ds.batch(self.batch_size, drop_remainder=True)
    return ds.map(batch_builder(self.train_rows, self.seq_len, self.batch_size))

  def _open_train(self, first_batch: int):
    ds = self._train_ds[first_batch:].to_iter_dataset(_READ)
    if self.num_workers > 0:
      _mark_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(ds)

  def train_iterator(self) -> TrainIterator:
    """A fresh infinite iterator from the first batch; see TrainIterator."""
    return TrainIterator(self)

  def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """Up to `n` held-out batches, the same on every call: this process's rows (strided by
    process), in corpus order, the last batch padded. Every process gets the same count."""
    rows = self.eval_rows.num_rows
    per_process = -(-rows // self.process_count)
    mine = np.arange(self.process_index, rows, self.process_count)
    count = min(int(n), -(-per_process // self.batch_size))
    make = batch_builder(self.eval_rows, self.seq_len, self.batch_size)
    return [make(mine[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(count)]

  def train_token_sample(self, max_tokens: int = _MAX_SAMPLE_TOKENS) -> np.ndarray:
    """[<= max_tokens] int32 train target tokens (all of them for small corpora), e.g. for
    `unigram_entropy`."""
    return self.train_rows.targets(max_tokens)

  def describe(self) -> str:
    """One line for logs."""
    return (f"data: {self.num_train_docs} train docs / {self.num_train_tokens:,} tokens, "
            f"{self.num_eval_docs} eval docs / {self.num_eval_tokens:,} tokens, "
            f"{self.train_rows.num_rows:,} rows of {self.seq_len} "
            f"({self.train_batches_per_epoch:.1f} batches/epoch/process), "
            f"tokenizer {self.tokenizer.name}")


def build_data(cfg: Any, tok: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
               vocab_size: int, process_index: int = 0, process_count: int = 1
               ) -> DataPipeline | RecallData:
  """Reads, tokenizes, validates, splits and packs the corpus of the data config `cfg`
  (ConfigDict or dict with keys source, tokenizer, text_field, eval_fraction, num_workers,
  shuffle). `batch_size` is per process; batches are dicts of [batch_size, seq_len] arrays.
  Every token id is checked against `vocab_size` here, before training starts. The source
  "recall[:settings]" is the synthetic long-range retrieval task of dsjax.data.recall."""
  settings = _data_settings(cfg)
  _check_shapes(seq_len, batch_size, process_index, process_count)
  if is_recall_source(settings["source"]):  # synthetic rows, generated as they are needed
    return build_recall_data(settings["source"], seq_len=seq_len, batch_size=batch_size,
                             seed=seed, vocab_size=vocab_size, process_index=process_index,
                             process_count=process_count)
  docs = load_documents(settings["source"], settings["text_field"])
  corpus = _tokenize(docs, tok, vocab_size)
  data = DataPipeline(settings, tok, corpus, seq_len=seq_len, batch_size=batch_size,
                      seed=seed, process_index=process_index, process_count=process_count)
  logging.info("%s", data.describe())
  return data
