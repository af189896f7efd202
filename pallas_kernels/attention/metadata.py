"""Which key blocks a query block can see, summarised per block so that fully hidden blocks
are skipped (no compute, and on TPU no copy).

The summary is conservative: block (i, j) counts as visible when the smallest key position
of key block j is <= the largest query position of query block i and their segment-id ranges
overlap (padding, segment id 0, excluded). Visible blocks of query block i then lie in
[k_start, k_end); the kernels still mask every element exactly, so a visible-looking block
that holds no visible pair costs time, never correctness. For causal masks (positions
increasing along the sequence) and packed documents the ranges are tight: a query block
sees the key blocks from its first document's start to the diagonal.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


class BlockRanges(NamedTuple):
  """int32 ranges (start inclusive, end exclusive; 0, 0 when empty): the key blocks each
  query block may see, k_start/k_end [B, T/bq], and the query blocks that may see each key
  block, q_start/q_end [B, S/bk]."""
  k_start: jax.Array
  k_end: jax.Array
  q_start: jax.Array
  q_end: jax.Array


def _blocks(x, block: int):
  return x.reshape(x.shape[0], -1, block)


def _summary(positions, segment_ids, block: int, position_reduce, position_fill):
  valid = _blocks(segment_ids != 0, block)
  pos = position_reduce(jnp.where(valid, _blocks(positions, block), position_fill), axis=-1)
  seg = _blocks(segment_ids, block)
  return (pos, jnp.min(jnp.where(valid, seg, _BIG), axis=-1),
          jnp.max(jnp.where(valid, seg, _SMALL), axis=-1))


def _range(visible, axis: int):
  n = visible.shape[axis]
  any_ = jnp.any(visible, axis=axis)
  first = jnp.argmax(visible, axis=axis)
  last = n - 1 - jnp.argmax(jnp.flip(visible, axis=axis), axis=axis)
  return (jnp.where(any_, first, 0).astype(jnp.int32),
          jnp.where(any_, last + 1, 0).astype(jnp.int32))


def block_visibility(q_positions, k_positions, q_segment_ids, k_segment_ids,
                     block_q: int, block_k: int) -> jax.Array:
  """bool [B, T/bq, S/bk]: whether query block i may see key block j (conservative). All
  inputs int32, lengths multiples of their blocks; segment id 0 marks padding (a query or key
  that takes part in nothing); pass ones for unpacked rows."""
  q_pos, q_lo, q_hi = _summary(q_positions, q_segment_ids, block_q, jnp.max, _SMALL)
  k_pos, k_lo, k_hi = _summary(k_positions, k_segment_ids, block_k, jnp.min, _BIG)
  return ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_lo[:, None, :] <= q_hi[:, :, None])
          & (q_lo[:, :, None] <= k_hi[:, None, :]))


def block_ranges(q_positions, k_positions, q_segment_ids, k_segment_ids,
                 block_q: int, block_k: int) -> BlockRanges:
  """BlockRanges of block_visibility's table."""
  visible = block_visibility(q_positions, k_positions, q_segment_ids, k_segment_ids,
                             block_q, block_k)
  return BlockRanges(*_range(visible, 2), *_range(visible, 1))
