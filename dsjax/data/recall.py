"""A synthetic long-range retrieval task: multi-query key-value recall over long rows.

Every row of T tokens is a haystack of random filler tokens holding `num_keys` facts at random
places. A fact is a key token followed by a value token; the bindings are drawn afresh for
every row (values with replacement, so no answer follows from the others), so they can only
be read from the row itself. The last 2 * num_keys tokens query every key once, in random
order: the key token, then its value token (the answer). Only the answers are predicted:
loss_mask marks the query positions, so a run's eval_accuracy is the fraction of
keys recalled, against a chance level of 1 / num_values. Facts lie anywhere in the first
T - 2 * num_keys tokens, so most are thousands of tokens away from their query in a 4k row.

With min_len > 0, training rows hold one episode of a log-uniform length in [min_len, T]
(then padding): at initialisation attention spreads over all earlier tokens, so the signal
that teaches a query to find its fact shrinks with the row length, and short episodes let a
model learn the mechanism that long ones test. Held-out rows are always full length.

Vocabulary: [0, F) filler | F + k key k | F + K + v value v; F + K + V ids in all (144 with
the defaults, within a byte vocabulary). Answering takes the induction mechanism: find the
earlier occurrence of the query's key and copy the token after it.

  source = "recall"                                    # defaults below
  source = "recall:num_keys=16,num_values=8,filler=64,min_len=256"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

_EVAL_SEED = 20241124  # held-out rows do not move with cfg.seed
_PREFIX = "recall"


@dataclasses.dataclass(frozen=True)
class RecallTask:
  """The row generator: `row(seed, stream, index)` is a pure function of its arguments."""
  seq_len: int
  num_keys: int = 8
  num_values: int = 8
  filler: int = 128
  min_len: int = 0  # > 0: training episodes are log-uniform in [min_len, seq_len] tokens

  @property
  def vocab_size(self) -> int:
    return self.filler + self.num_keys + self.num_values

  def key_token(self, key):
    return self.filler + key

  def value_token(self, value):
    return self.filler + self.num_keys + value

  def check(self, vocab_size: int) -> None:
    if min(self.num_keys, self.num_values, self.filler) < 1:
      raise ValueError(f"recall task {self}: num_keys, num_values and filler must be >= 1; "
                       "fix --config.data.source.")
    shortest = self.min_len or self.seq_len
    if shortest < 4 * self.num_keys:
      raise ValueError(f"recall task: an episode of {shortest} tokens cannot hold "
                       f"{self.num_keys} facts and {self.num_keys} queries; set "
                       f"--config.train.seq_len (and min_len) >= {4 * self.num_keys} or "
                       "fewer num_keys.")
    if self.min_len > self.seq_len:
      raise ValueError(f"recall task: min_len={self.min_len} exceeds seq_len={self.seq_len}; "
                       "lower min_len in --config.data.source.")
    if self.vocab_size > vocab_size:
      raise ValueError(f"recall task needs {self.vocab_size} token ids but the model has "
                       f"vocab_size={vocab_size}; set --config.model.vocab_size >= "
                       f"{self.vocab_size} or a smaller filler / num_keys / num_values.")

  def episode_length(self, rng: np.random.Generator, full: bool) -> int:
    """seq_len, or for a training row with min_len > 0 a log-uniform draw in
    [min_len, seq_len]."""
    if full or not self.min_len:
      return self.seq_len
    return int(np.exp(rng.uniform(np.log(self.min_len), np.log(self.seq_len + 1))))

  def row(self, seed: int, stream: int, index: int) -> dict[str, np.ndarray]:
    """One row: inputs, targets, segment_ids, positions (int32) and loss_mask (float32), [T].
    Stream 0 is training (episodes of `episode_length`), any other stream held out (full
    rows). An episode shorter than the row is followed by padding (segment 0, no loss)."""
    rng = np.random.default_rng([seed % 2**32, stream, index])
    t, k = self.seq_len, self.num_keys
    length = self.episode_length(rng, full=stream != 0)
    tokens = np.zeros(t + 1, np.int64)
    tokens[:length] = rng.integers(0, self.filler, length)
    values = rng.integers(0, self.num_values, k)
    haystack = length - 2 * k
    # k facts "key value" at distinct, non-overlapping places (2 tokens each)
    places = 2 * rng.choice(haystack // 2, k, replace=False)
    tokens[places] = self.key_token(np.arange(k))
    tokens[places + 1] = self.value_token(values)
    order = rng.permutation(k)
    queries = haystack + 2 * np.arange(k)
    tokens[queries] = self.key_token(order)
    tokens[queries + 1] = self.value_token(values[order])
    loss_mask = np.zeros(t, np.float32)
    loss_mask[queries] = 1.0
    segment_ids = (np.arange(t) < length).astype(np.int32)
    return {"inputs": tokens[:t].astype(np.int32), "targets": tokens[1:].astype(np.int32),
            "segment_ids": segment_ids, "positions": np.arange(t, dtype=np.int32),
            "loss_mask": loss_mask}


def is_recall_source(source: str) -> bool:
  return source == _PREFIX or source.startswith(_PREFIX + ":")


def parse_recall_source(source: str, seq_len: int) -> RecallTask:
  """"recall" or "recall:name=int,..." -> RecallTask; unknown names are errors."""
  fields = {f.name for f in dataclasses.fields(RecallTask)} - {"seq_len"}
  settings: dict[str, int] = {}
  spec = source[len(_PREFIX) + 1:]
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if name.strip() not in fields or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"data.source {source!r}: {item!r} is not one of "
                       f"{sorted(fields)} = <int>; e.g. 'recall:num_keys=8,num_values=8'.")
    settings[name.strip()] = int(value)
  return RecallTask(seq_len=seq_len, **settings)


class RecallIterator:
  """Infinite training batches; the state is the batch count (as TrainIterator's)."""

  def __init__(self, data: "RecallData"):
    self._data, self._next_batch = data, 0

  def __iter__(self) -> "RecallIterator":
    return self

  def __enter__(self) -> "RecallIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._data.train_batch(self._next_batch)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch, **self._data.fingerprint()}

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self._data.fingerprint()
    if not isinstance(state, dict) or "next_batch" not in state or any(
        state.get(k) != v for k, v in mine.items()):
      raise ValueError(f"Data iterator state {state!r:.120} is not from this recall task "
                       f"({mine}); restore with the same data settings.")
    self._next_batch = int(state["next_batch"])

  def close(self) -> None:
    pass


class RecallData:
  """The recall task as a training data pipeline (the interface of DataPipeline that the
  training loop uses): train rows are drawn by (seed, row index), held-out rows by a fixed
  seed, so both are reproducible and never overlap in their random streams."""

  def __init__(self, task: RecallTask, *, batch_size: int, seed: int, process_index: int,
               process_count: int):
    self.task, self.batch_size, self.seed = task, batch_size, int(seed)
    self.seq_len = task.seq_len
    self.process_index, self.process_count = process_index, process_count

  def _batch(self, seed: int, stream: int, first_row: int) -> dict[str, np.ndarray]:
    rows = [self.task.row(seed, stream, first_row + i) for i in range(self.batch_size)]
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

  def train_batch(self, index: int) -> dict[str, np.ndarray]:
    per_step = self.batch_size * self.process_count
    return self._batch(self.seed, 0, index * per_step + self.process_index * self.batch_size)

  def train_iterator(self) -> RecallIterator:
    return RecallIterator(self)

  def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
    """`n` held-out batches, the same on every call and for every training seed."""
    per_step = self.batch_size * self.process_count
    return [self._batch(_EVAL_SEED, 1, i * per_step + self.process_index * self.batch_size)
            for i in range(n)]

  @property
  def num_train_tokens(self) -> int:
    """Answer (loss-bearing) tokens per batch: the task has no epochs."""
    return self.batch_size * self.process_count * self.task.num_keys

  def fingerprint(self) -> dict[str, Any]:
    return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "process_index": self.process_index, "process_count": self.process_count,
            "recall": list(dataclasses.astuple(self.task))}

  def describe(self) -> str:
    t = self.task
    return (f"data: synthetic key-value recall, rows of {t.seq_len} tokens with {t.num_keys} "
            f"facts ({t.num_values} values, {t.filler} filler ids) and {t.num_keys} queries; "
            f"chance accuracy {1 / t.num_values:.3f}")


def build_recall_data(source: str, *, seq_len: int, batch_size: int, seed: int,
                      vocab_size: int, process_index: int = 0, process_count: int = 1
                      ) -> RecallData:
  task = parse_recall_source(source, seq_len)
  task.check(vocab_size)
  return RecallData(task, batch_size=batch_size, seed=seed, process_index=process_index,
                    process_count=process_count)
