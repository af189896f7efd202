"""The packed batch stream: layout invariants, determinism, held-out split, checkpoint state,
process sharding and Grain worker processes."""

import json
import math
import time

import ml_collections
import numpy as np
import pytest

from dsjax.data import (ByteTokenizer, build_data, default_documents, make_tokenizer,
                        unigram_entropy)
from dsjax.data.packing import chunk_documents, pack_rows
from dsjax.experiment import DEFAULTS

T, B = 64, 4
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def data_cfg(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**DEFAULTS["data"], **overrides})


def build(seq_len=T, batch_size=B, seed=0, vocab_size=256, **overrides):
  """Byte-tokenized pipeline; pre-tokenized sources may use any `vocab_size`."""
  return build_data(data_cfg(**overrides), ByteTokenizer(), seq_len=seq_len,
                    batch_size=batch_size, seed=seed, vocab_size=vocab_size)


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b)
                                  for k in KEYS)


def segments(batch):
  """(row, segment id, inputs, targets) of every segment in the batch."""
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      yield r, s, batch["inputs"][r][seg == s], batch["targets"][r][seg == s]


def unique_token_corpus(tmp_path, lengths, first=0):
  """Pre-tokenized JSONL whose documents hold consecutive, globally unique ids."""
  docs, start = [], first
  for n in lengths:
    docs.append({"tokens": list(range(start, start + n))})
    start += n
  path = tmp_path / "u.jsonl"
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return str(path), start


@pytest.fixture(scope="module")
def default_data():
  return build()


def test_build_is_fast_and_batches_have_the_layout(default_data):
  start = time.perf_counter()
  build()
  assert time.perf_counter() - start < 2.0  # tokenize + chunk + pack 465 KB, set up Grain
  batch = next(default_data.train_iterator())
  for key in KEYS:
    assert batch[key].shape == (B, T)
    assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
  assert default_data.num_train_tokens > 400_000 and default_data.num_eval_tokens > 0
  sample = default_data.train_token_sample()
  assert sample.dtype == np.int32 and sample.size == default_data.num_train_tokens
  assert 3.0 < unigram_entropy(sample) < math.log(256)
  assert default_data.train_token_sample(1000).size == 1000


def test_segment_invariants(default_data):
  it = default_data.train_iterator()
  for batch in take(it, 30) + default_data.eval_batches(5):
    seg, pos = batch["segment_ids"], batch["positions"]
    np.testing.assert_array_equal(batch["loss_mask"], (seg > 0).astype(np.float32))
    pad = seg == 0
    assert not (batch["inputs"][pad].any() or batch["targets"][pad].any() or pos[pad].any())
    cont = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)  # same segment continues
    np.testing.assert_array_equal(batch["targets"][:, :-1][cont], batch["inputs"][:, 1:][cont])
    np.testing.assert_array_equal(pos[:, 1:][cont], pos[:, :-1][cont] + 1)
    starts = (seg > 0) & np.concatenate([np.ones_like(seg[:, :1], bool), ~cont], axis=1)
    assert not pos[starts].any()  # positions restart at every segment
    for row in seg:  # ids count 1, 2, .. left to right, padding only at the end
      ids = row[row > 0]
      assert (np.diff(ids) >= 0).all() and (ids[0] if ids.size else 1) == 1
      assert (row[ids.size:] == 0).all()


def test_decoded_segments_are_corpus_substrings(default_data):
  corpus = b"\0".join(d.encode() for d in default_documents())
  batches = take(default_data.train_iterator(), 10)
  found = [bytes(inp.astype(np.uint8).tolist()) in corpus and
           bytes(tgt.astype(np.uint8).tolist()) in corpus
           for batch in batches for _, _, inp, tgt in segments(batch)]
  assert len(found) >= len(batches) * B and all(found)


def test_every_pair_is_packed_exactly_once(tmp_path):
  lengths = [1, 2, 5, 7, 8, 9, 15, 16, 30, 3]
  path, _ = unique_token_corpus(tmp_path, lengths)
  data = build(seq_len=7, batch_size=1, vocab_size=1000, source=path, eval_fraction=0.0)
  assert data.eval_batches(3) == [] and data.num_eval_tokens == 0
  rows = data.train_rows.num_rows
  pairs = sorted((int(i), int(t)) for batch in take(data.train_iterator(), rows)
                 for _, _, inp, tgt in segments(batch) for i, t in zip(inp, tgt))
  assert pairs == sorted((i, i + 1) for i in range(sum(lengths)) if
                         i + 1 < sum(lengths) and i + 1 not in np.cumsum(lengths))


def test_packing_plan_fits_rows():
  starts, lengths = chunk_documents(np.array([0, 1, 3, 40, 41, 100]), 8)
  assert lengths.min() >= 1 and lengths.max() <= 8 and len(starts) == 1 + 5 + 8
  row_ptr, seg_chunk = pack_rows(lengths, 8)
  assert sorted(seg_chunk.tolist()) == list(range(len(lengths)))
  fill = np.add.reduceat(lengths[seg_chunk], row_ptr[:-1])
  assert (fill <= 8).all() and row_ptr[-1] == len(lengths)
  assert len(row_ptr) - 1 == -(-lengths.sum() // 8)  # best fit needs no extra row here


def test_determinism_and_epoch_reshuffle(default_data, tmp_path):
  again = take(build().train_iterator(), 5)
  assert same(take(default_data.train_iterator(), 5), again)
  assert not same(take(build(seed=1).train_iterator(), 5), again)
  path, _ = unique_token_corpus(tmp_path, [9] * 12)
  data = build(seq_len=8, batch_size=3, vocab_size=200, source=path, eval_fraction=0.0)
  rows_per_epoch = data.train_rows.num_rows  # 12 full rows: 4 batches an epoch
  order = [tuple(r) for b in take(data.train_iterator(), 8) for r in b["inputs"]]
  first, second = order[:rows_per_epoch], order[rows_per_epoch:]
  assert sorted(first) == sorted(second) and first != second


def test_unshuffled_stream_follows_the_corpus(tmp_path):
  path, _ = unique_token_corpus(tmp_path, [20, 20])
  data = build(seq_len=8, batch_size=2, vocab_size=100, source=path, eval_fraction=0.0,
               shuffle=False)
  assert next(data.train_iterator())["inputs"][0].tolist() == list(range(8))


def test_eval_documents_never_in_train(tmp_path):
  lengths = [10 + 7 * (d % 5) for d in range(40)]
  path, _ = unique_token_corpus(tmp_path, lengths)
  doc_of = np.repeat(np.arange(40), lengths)
  data = build(seq_len=16, batch_size=4, vocab_size=1000, source=path, eval_fraction=0.1)
  two_epochs = -(-data.train_rows.num_rows * 2 // 4)
  train_docs = {int(d) for b in take(data.train_iterator(), two_epochs)
                for d in doc_of[b["inputs"][b["loss_mask"] > 0]]}
  evals = data.eval_batches(100)
  eval_docs = {int(d) for b in evals for d in doc_of[b["inputs"][b["loss_mask"] > 0]]}
  assert len(eval_docs) == 4 and len(train_docs) == 36 and not train_docs & eval_docs
  assert same(evals, data.eval_batches(100)) and same(evals[:1], data.eval_batches(1))
  assert same(evals, build(seq_len=16, batch_size=4, vocab_size=1000, seed=5, source=path,
                           eval_fraction=0.1).eval_batches(100))  # not the train seed's
  assert sum(int(b["loss_mask"].sum()) for b in evals) == data.num_eval_tokens


def test_single_document_holds_out_its_tail(tmp_path):
  path, _ = unique_token_corpus(tmp_path, [401])
  data = build(seq_len=10, batch_size=2, vocab_size=500, source=path, eval_fraction=0.2)
  assert data.num_eval_tokens == 80 and data.num_train_tokens == 320
  evals = data.eval_batches(10)
  eval_min = min(int(b["inputs"][b["loss_mask"] > 0].min()) for b in evals)
  train = take(data.train_iterator(), 20)
  assert eval_min == 320
  assert max(int(b["inputs"].max()) for b in train) < eval_min
  assert max(int(b["targets"].max()) for b in train) <= eval_min


def test_state_save_and_restore(default_data):
  it = default_data.train_iterator()
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  restored = build().train_iterator()
  restored.set_state(state)
  assert same(take(restored, 5), expected)
  with pytest.raises(ValueError, match=r"seq_len 64 \(state\) vs 32 \(now\)"):
    build(seq_len=32).train_iterator().set_state(state)
  with pytest.raises(ValueError, match="not a dsjax data iterator state"):
    restored.set_state({"next_index": 3})


def test_process_shards_are_disjoint_and_cover_the_stream(default_data):
  cfg, tok = data_cfg(), make_tokenizer("byte", 256)
  shards = [take(build_data(cfg, tok, seq_len=T, batch_size=B, seed=0, vocab_size=256,
                            process_index=p, process_count=2).train_iterator(), 6)
            for p in range(2)]
  whole = take(default_data.train_iterator(), 12)  # the global stream, B rows a batch
  global_rows = np.concatenate([b["inputs"] for b in whole])
  for p, shard in enumerate(shards):
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in shard]),
                                  global_rows[p::2])
  rows = [{r.tobytes() for b in shard for r in b["inputs"]} for shard in shards]
  assert not rows[0] & rows[1]


def test_workers_match_main_process_and_restore(default_data):
  reference = take(default_data.train_iterator(), 10)
  it = build(num_workers=2).train_iterator()
  try:
    assert same(take(it, 5), reference[:5])
    state = it.get_state()
    assert same(take(it, 5), reference[5:])
    it.set_state(state)  # restarts the workers at batch 5
    assert same(take(it, 5), reference[5:])
  finally:
    it.close()
  resumed = default_data.train_iterator()  # the state does not depend on the worker count
  resumed.set_state(state)
  assert same(take(resumed, 5), reference[5:])


def test_token_ids_out_of_range(tmp_path):
  path, _ = unique_token_corpus(tmp_path, [5, 5, 5])
  with pytest.raises(ValueError, match=r"Token id 10 from .*u\.jsonl:3 \(pre-tokenized.*"
                                       r"\[0, 10\).*vocab_size"):
    build(vocab_size=10, source=path)
  from tests.data.test_tokenizer import write_word_tokenizer
  tok = make_tokenizer(write_word_tokenizer(tmp_path), model_vocab_size=7)
  (tmp_path / "w.txt").write_text("hello world pipeline")
  with pytest.raises(ValueError, match=r"Token id 6 from .*w\.txt \(produced by tokenizer"):
    build_data(data_cfg(source=str(tmp_path / "w.txt")), tok, seq_len=8, batch_size=1,
               seed=0, vocab_size=6)


def test_hf_tokenizer_wraps_documents(tmp_path):
  from tests.data.test_tokenizer import write_word_tokenizer
  tok = make_tokenizer(write_word_tokenizer(tmp_path), model_vocab_size=7)
  (tmp_path / "docs").mkdir()
  for i, text in enumerate(["hello world", "data pipeline data", "world"]):
    (tmp_path / "docs" / f"{i}.txt").write_text(text)
  data = build_data(data_cfg(source=str(tmp_path / "docs"), eval_fraction=0.0), tok,
                    seq_len=8, batch_size=2, seed=0, vocab_size=7)
  assert data.train_rows.tokens.tolist() == [1, 3, 4, 2, 1, 5, 6, 5, 2, 1, 4, 2]
  assert data.train_token_sample().tolist().count(2) == 3  # eos is a target, bos is not


def test_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing\.txt.*--config\.data\.source"):
    build(source=str(tmp_path / "nothing.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
    build(source=str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match=r"--config\.data\.eval_fraction"):
    build(eval_fraction=1.0)
  with pytest.raises(ValueError, match=r"unknown \['sorce'\]"):
    build_data({**DEFAULTS["data"], "sorce": "x"}, make_tokenizer("byte", 256), seq_len=8,
               batch_size=1, seed=0, vocab_size=256)
