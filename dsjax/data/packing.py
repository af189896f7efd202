"""Chunking documents and packing the chunks into fixed-length rows (pure numpy).

A document of n tokens gives chunks of at most seq_len + 1 tokens, consecutive chunks
sharing one boundary token, so every next-token pair of the document is trained on exactly
once. A chunk of length L + 1 contributes L (input, target) pairs to one segment of a row.

Packing is planned once, up front, as a table of rows -> segments, and every batch is built
from that table by index. That keeps the whole pipeline a random-access Grain MapDataset:
deterministic, checkpointable by a batch counter, and identical for any number of Grain
worker processes (Grain's own packing transforms run per worker, which changes the output
with the worker count).
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np


def chunk_documents(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunks of the documents `tokens[offsets[d]:offsets[d+1]]`.

  Args:
    offsets: [D + 1] document boundaries in the concatenated token array.
    seq_len: T, the row length.
  Returns:
    (starts, lengths), each [C] int64: chunk c is tokens[starts[c] : starts[c] + lengths[c]
    + 1], giving lengths[c] in [1, T] input/target pairs. Documents of < 2 tokens give none.
  """
  offsets = np.asarray(offsets, dtype=np.int64)
  sizes = np.diff(offsets)
  # ceil((n - 1) / T) chunks for n >= 2 tokens.
  counts = np.where(sizes >= 2, (sizes - 2) // seq_len + 1, 0)
  doc = np.repeat(np.arange(len(sizes)), counts)
  first_chunk = np.cumsum(counts) - counts
  within = np.arange(counts.sum(), dtype=np.int64) - np.repeat(first_chunk, counts)
  starts = offsets[doc] + seq_len * within
  lengths = np.minimum(seq_len, sizes[doc] - 1 - seq_len * within)
  return starts, lengths


def pack_rows(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Online best-fit packing of chunks, taken in the given order, into rows of `seq_len`.

  Full chunks fill a row alone; a shorter chunk goes into the open row with the least room
  that still fits it (rows are found through a sorted list of distinct free capacities, so
  this is O(C log T)). Row order is creation order, so the input order is mostly kept.

  Args:
    lengths: [C] chunk lengths, each in [1, seq_len].
    seq_len: T.
  Returns:
    (row_ptr [R + 1], seg_chunk [C]): row r holds chunks seg_chunk[row_ptr[r]:row_ptr[r+1]],
    in that order.
  """
  rows: list[list[int]] = []
  capacities: list[int] = []          # sorted distinct free capacities of open rows
  rows_with: dict[int, list[int]] = {}  # free capacity -> open rows having exactly that
  for chunk, length in enumerate(np.asarray(lengths).tolist()):
    if length >= seq_len:
      rows.append([chunk])
      continue
    slot = bisect.bisect_left(capacities, length)
    if slot == len(capacities):
      row, free = len(rows), seq_len
      rows.append([chunk])
    else:
      free = capacities[slot]
      row = rows_with[free].pop()
      if not rows_with[free]:
        del rows_with[free]
        capacities.pop(slot)
      rows[row].append(chunk)
    left = free - length
    if left > 0:
      if left not in rows_with:
        rows_with[left] = []
        bisect.insort(capacities, left)
      rows_with[left].append(row)
  row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
  row_ptr[1:] = np.cumsum([len(r) for r in rows])
  seg_chunk = np.fromiter((c for r in rows for c in r), dtype=np.int64, count=int(row_ptr[-1]))
  return row_ptr, seg_chunk


@dataclasses.dataclass
class PackedRows:
  """Rows -> segments table over one token array. Segment s of row r (for s in
  row_ptr[r]:row_ptr[r+1]) has inputs tokens[seg_start[s] : +seg_len[s]] and targets one
  token further."""
  tokens: np.ndarray   # [N] int32, all documents concatenated
  row_ptr: np.ndarray  # [R + 1] int64
  seg_start: np.ndarray  # [S] int64
  seg_len: np.ndarray  # [S] int64

  @classmethod
  def build(cls, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
            seq_len: int) -> "PackedRows":
    """Packs the chunks (starts, lengths), [C] each, in the given order."""
    row_ptr, seg_chunk = pack_rows(lengths, seq_len)
    return cls(tokens, row_ptr, starts[seg_chunk], lengths[seg_chunk])

  @property
  def num_rows(self) -> int:
    return len(self.row_ptr) - 1

  @property
  def num_targets(self) -> int:
    """Real (non-padding) target tokens over all rows."""
    return int(self.seg_len.sum())

  def targets(self, max_tokens: int) -> np.ndarray:
    """[<= max_tokens] int32: the target tokens of whole segments, segments evenly spaced
    over the table when they do not all fit."""
    total = self.num_targets
    step = max(1, -(-total // max_tokens))  # ceil: take every step-th segment
    segs = np.arange(0, len(self.seg_len), step)
    lens = self.seg_len[segs]
    idx = np.repeat(self.seg_start[segs] + 1 - (np.cumsum(lens) - lens), lens)
    idx += np.arange(int(lens.sum()), dtype=np.int64)
    return self.tokens[idx][:max_tokens].astype(np.int32)


def batch_builder(rows: PackedRows, seq_len: int, batch_size: int):
  """A function mapping row indices ([<= B] ints; missing rows are all padding) to a batch:
  inputs, targets, segment_ids, positions (int32) and loss_mask (float32), each [B, T].
  Segment ids count 1, 2, .. within a row and are 0 in padding; positions restart at 0 in
  every segment.

  It is a closure over plain arrays because Grain pickles it (cloudpickle) into each worker
  process: a closure is sent by value, so a worker needs only numpy, not the dsjax package
  (whose import pulls in jax and takes seconds per worker).
  """
  tokens, row_ptr = rows.tokens, rows.row_ptr
  seg_start, seg_len = rows.seg_start, rows.seg_len
  shape = (batch_size, seq_len)

  def build_batch(row_ids):
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for b, r in enumerate(np.asarray(row_ids, dtype=np.int64).reshape(-1)):
      col = 0
      for k, s in enumerate(range(row_ptr[r], row_ptr[r + 1]), start=1):
        start, n = int(seg_start[s]), int(seg_len[s])
        inputs[b, col:col + n] = tokens[start:start + n]
        targets[b, col:col + n] = tokens[start + 1:start + n + 1]
        segment_ids[b, col:col + n] = k
        positions[b, col:col + n] = np.arange(n, dtype=np.int32)
        col += n
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": (segment_ids > 0).astype(np.float32)}

  return build_batch


def unigram_entropy(token_ids) -> float:
  """Entropy, in nats per token, of the empirical unigram distribution of `token_ids` ([N]
  non-negative ints): the loss of a model that predicts token frequencies and ignores
  context, a baseline the training loss should fall well below."""
  ids = np.asarray(token_ids).reshape(-1)
  if ids.size == 0:
    raise ValueError("unigram_entropy needs at least one token; pass a non-empty array.")
  if ids.dtype.kind not in "iu" or ids.min() < 0:
    raise ValueError("unigram_entropy needs non-negative integer token ids; check the input.")
  counts = np.bincount(ids)
  p = counts[counts > 0] / ids.size
  return float(-(p * np.log(p)).sum())
