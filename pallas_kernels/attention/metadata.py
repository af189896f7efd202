"""Which key blocks a query block can see, summarised per block so that fully hidden blocks
are skipped (no compute, and on TPU no copy).

The summary is conservative. Block (i, j) counts as visible when all three hold (padding,
segment id 0, left out of every bound):
  - the smallest key position of key block j is <= the largest query position of block i;
  - the smallest (segment, position) pair of key block j is <= the largest pair of query
    block i, in lexicographic order (a visible pair has equal segments and k_pos <= q_pos);
  - their segment-id ranges overlap.
Visible blocks of query block i then lie in [k_start, k_end); the kernels still mask every
element exactly, so a visible-looking block that holds no visible pair costs time, never
correctness. For causal masks and packed documents (positions restarting at 0) the ranges
are the blocks from the first document's start to the diagonal.
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


class _Summary(NamedTuple):
  """Per block [B, n]: the extreme position (max for queries, min for keys), the extreme
  (segment, position) pair in lexicographic order (max / min), and the segment-id range."""
  pos: jax.Array
  pair_seg: jax.Array
  pair_pos: jax.Array
  seg_lo: jax.Array
  seg_hi: jax.Array


def _summary(positions, segment_ids, block: int, largest: bool) -> _Summary:
  reduce, fill = (jnp.max, _SMALL) if largest else (jnp.min, _BIG)
  valid = _blocks(segment_ids != 0, block)
  pos, seg = _blocks(positions, block), _blocks(segment_ids, block)
  seg_lo = jnp.min(jnp.where(valid, seg, _BIG), axis=-1)
  seg_hi = jnp.max(jnp.where(valid, seg, _SMALL), axis=-1)
  pair_seg = seg_hi if largest else seg_lo
  pair_pos = reduce(jnp.where(valid & (seg == pair_seg[..., None]), pos, fill), axis=-1)
  return _Summary(reduce(jnp.where(valid, pos, fill), axis=-1), pair_seg, pair_pos, seg_lo,
                  seg_hi)


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
  q = jax.tree.map(lambda x: x[:, :, None],
                   _summary(q_positions, q_segment_ids, block_q, largest=True))
  k = jax.tree.map(lambda x: x[:, None, :],
                   _summary(k_positions, k_segment_ids, block_k, largest=False))
  pair_before = (k.pair_seg < q.pair_seg) | ((k.pair_seg == q.pair_seg)
                                             & (k.pair_pos <= q.pair_pos))
  return ((k.pos <= q.pos) & pair_before & (k.seg_lo <= q.seg_hi) & (q.seg_lo <= k.seg_hi))


def block_ranges(q_positions, k_positions, q_segment_ids, k_segment_ids,
                 block_q: int, block_k: int) -> BlockRanges:
  """BlockRanges of block_visibility's table."""
  visible = block_visibility(q_positions, k_positions, q_segment_ids, k_segment_ids,
                             block_q, block_k)
  return BlockRanges(*_range(visible, 2), *_range(visible, 1))
