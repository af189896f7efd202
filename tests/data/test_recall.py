"""The synthetic key-value recall task: every answer is the value its row's fact binds to the
queried key, only answers carry loss, rows are reproducible, and the pipeline interface
(batches, resume state, errors) holds."""

import json

import numpy as np
import pytest

from dsjax.data import build_data
from dsjax.data.recall import RecallTask, parse_recall_source

_DATA = dict(source="recall", tokenizer="byte", text_field="text", eval_fraction=0.1,
             num_workers=0, shuffle=True)


def _decode_facts(task: RecallTask, inputs: np.ndarray, end: int) -> dict[int, tuple[int, int]]:
  """{key: (value, position of the key)} read back from the facts before position `end`."""
  keys = np.flatnonzero((inputs[:end] >= task.key_token(0))
                        & (inputs[:end] <= task.key_token(task.num_keys - 1)))
  facts = {}
  for pos in keys:
    key = int(inputs[pos]) - task.key_token(0)
    assert key not in facts, "each key has exactly one fact"
    value = int(inputs[pos + 1]) - task.value_token(0)
    assert 0 <= value < task.num_values, "a value follows every key"
    facts[key] = (value, int(pos))
  return facts


@pytest.mark.parametrize("index", range(5))
def test_answers_are_the_values_the_facts_bind(index):
  task = RecallTask(seq_len=300, num_keys=6, num_values=5, filler=40)
  row = task.row(seed=3, stream=0, index=index)
  inputs, targets, mask = row["inputs"], row["targets"], row["loss_mask"]
  queries = np.flatnonzero(mask)
  assert len(queries) == 6 and mask.sum() == 6
  facts = _decode_facts(task, inputs, queries[0])
  assert sorted(facts) == list(range(6))
  asked = []
  for pos in queries:
    key = int(inputs[pos]) - task.key_token(0)
    assert 0 <= key < task.num_keys
    value, fact_pos = facts[key]
    assert fact_pos < pos
    assert targets[pos] == task.value_token(value)
    asked.append(key)
  assert sorted(asked) == list(range(6)), "every key is asked once"
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert inputs.max() < task.vocab_size and inputs.min() >= 0


def test_rows_are_reproducible_and_differ_by_index_and_stream():
  task = RecallTask(seq_len=128)
  a, b = task.row(0, 0, 7), task.row(0, 0, 7)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["inputs"], task.row(0, 0, 8)["inputs"])
  assert not np.array_equal(a["inputs"], task.row(0, 1, 7)["inputs"])


def test_facts_spread_over_the_whole_row():
  """In 4k rows most facts are far beyond a short attention window from their query."""
  task = RecallTask(seq_len=4096)
  distances = []
  for index in range(20):
    row = task.row(0, 0, index)
    queries = np.flatnonzero(row["loss_mask"])
    facts = _decode_facts(task, row["inputs"], queries[0])
    for pos in queries:
      key = int(row["inputs"][pos]) - task.key_token(0)
      distances.append(pos - facts[key][1])
  assert np.median(distances) > 1500 and np.mean(np.asarray(distances) > 256) > 0.9


def test_pipeline_batches_resume_and_eval():
  data = build_data(_DATA, None, seq_len=64, batch_size=3, seed=1, vocab_size=256)
  it = data.train_iterator()
  first = [next(it) for _ in range(3)]
  assert first[0]["inputs"].shape == (3, 64) and first[0]["loss_mask"].dtype == np.float32
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
  following = next(it)
  resumed = build_data(_DATA, None, seq_len=64, batch_size=3, seed=1,
                       vocab_size=256).train_iterator()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["inputs"], following["inputs"])
  other_seed = build_data(_DATA, None, seq_len=64, batch_size=3, seed=2, vocab_size=256)
  assert not np.array_equal(next(other_seed.train_iterator())["inputs"], first[0]["inputs"])
  with pytest.raises(ValueError, match="not from this recall task"):
    other_seed.train_iterator().set_state(state)
  # Held-out rows: fixed across calls and seeds, disjoint from the train stream.
  evals = data.eval_batches(2)
  np.testing.assert_array_equal(evals[1]["inputs"], other_seed.eval_batches(2)[1]["inputs"])
  assert not any(np.array_equal(e["inputs"], f["inputs"]) for e in evals for f in first)


def test_process_shares_are_disjoint_parts_of_the_global_batch():
  whole = build_data(_DATA, None, seq_len=32, batch_size=4, seed=0, vocab_size=256)
  halves = [build_data(_DATA, None, seq_len=32, batch_size=2, seed=0, vocab_size=256,
                       process_index=p, process_count=2) for p in range(2)]
  glued = np.concatenate([next(h.train_iterator())["inputs"] for h in halves])
  np.testing.assert_array_equal(glued, next(whole.train_iterator())["inputs"])


@pytest.mark.parametrize("source, seq_len, vocab, message", [
    ("recall:num_keys=8,colour=3", 64, 256, "is not one of"),
    ("recall:num_keys=x", 64, 256, "is not one of"),
    ("recall:num_keys=40", 64, 256, "cannot hold"),
    ("recall:filler=250,num_keys=8", 256, 256, "vocab_size=256"),
    ("recall:num_values=0", 64, 256, "must be >= 1"),
])
def test_bad_settings_name_the_fix(source, seq_len, vocab, message):
  with pytest.raises(ValueError, match=message):
    build_data({**_DATA, "source": source}, None, seq_len=seq_len, batch_size=1, seed=0,
               vocab_size=vocab)


def test_source_settings_parse():
  task = parse_recall_source("recall:num_keys=16,num_values=4,filler=64", 512)
  assert (task.num_keys, task.num_values, task.filler, task.seq_len) == (16, 4, 64, 512)
  assert task.vocab_size == 64 + 16 + 4


def test_short_training_episodes_are_padded_and_held_out_rows_are_full():
  """min_len: a training row holds one episode of log-uniform length in [min_len, T], then
  padding (segment 0, no loss, after every query so causal attention never reads it)."""
  task = RecallTask(seq_len=512, num_keys=4, min_len=64)
  lengths = []
  for index in range(200):
    row = task.row(0, 0, index)
    length = int(row["segment_ids"].sum())
    lengths.append(length)
    assert 64 <= length <= 512
    np.testing.assert_array_equal(row["segment_ids"][:length], 1)
    queries = np.flatnonzero(row["loss_mask"])
    assert len(queries) == 4 and queries[-1] + 1 == length - 1   # the last answer ends it
    assert not row["inputs"][length:].any()
  assert min(lengths) < 128 and max(lengths) > 384 and 128 < np.median(lengths) < 256
  held_out = task.row(0, 1, 0)
  assert held_out["segment_ids"].all() and np.flatnonzero(held_out["loss_mask"])[-1] == 510
