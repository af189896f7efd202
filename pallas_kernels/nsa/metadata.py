"""The inverse of block_indices, for the dk/dv kernels: for each key block, the queries that
selected it.

Sorting the (query, slot) pairs of a kv head by the block they selected is the same move as
sorting tokens by expert in a dropless MoE: each key block then owns one contiguous run of
query positions, so a dk/dv kernel program per key block walks its run and writes its own
rows once, with no scatter and no atomics.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def selects_block(block_indices: jax.Array, block_size: int, key_end, key_start=0
                  ) -> jax.Array:
  """Whether an entry of block_indices names a block with at least one allowed key for its
  query, whose allowed keys are key_start .. key_end (by default 0 .. the query's own
  position t; key_end < T): j >= 0, j*l' <= key_end, (j+1)*l' > key_start and key_start <=
  key_end. Then the block's token max(j*l', key_start) is allowed. Entries that fail it
  contribute nothing and are skipped."""
  return ((block_indices >= 0) & (block_indices * block_size <= key_end)
          & ((block_indices + 1) * block_size > key_start) & (key_start <= key_end))


class QueryLists(NamedTuple):
  """queries[b, h, starts[b,h,j] : starts[b,h,j+1]] are the query positions t (ascending)
  whose row selects key block j; key_starts and key_ends are the same entries' first and
  last allowed keys. Entries past starts[b,h,num_blocks] are the skipped pairs and are
  never read as a list."""
  queries: jax.Array     # int32 [B,H,T*S]
  starts: jax.Array      # int32 [B,H,num_blocks+1]
  key_starts: jax.Array  # int32 [B,H,T*S]
  key_ends: jax.Array    # int32 [B,H,T*S]


def block_query_lists(block_indices: jax.Array, block_size: int, num_blocks: int,
                      key_start: jax.Array | None = None, key_end: jax.Array | None = None
                      ) -> QueryLists:
  """block_indices [B,T,H,S] (and each query's first and last allowed keys, key_start and
  key_end int[B,T], None for 0 and the query's position) -> the QueryLists of every key
  block. Pairs that fail selects_block (-1, a block wholly after key_end or wholly before
  key_start) are left out."""
  b, t, h, s = block_indices.shape
  idx = jnp.transpose(block_indices.astype(jnp.int32), (0, 2, 1, 3)).reshape(b, h, t * s)

  def per_pair(x):  # int[B,T] -> the value of each (query, slot) pair, [B,H,T*S]
    return jnp.broadcast_to(jnp.repeat(x.astype(jnp.int32), s, axis=1)[:, None], idx.shape)
  query_pos = per_pair(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  first_key = jnp.zeros_like(idx) if key_start is None else per_pair(key_start)
  last_key = query_pos if key_end is None else per_pair(key_end)
  key = jnp.where(selects_block(idx, block_size, last_key, first_key), idx, num_blocks)
  # A stable sort keeps each block's queries ascending, so dk/dv sum in a fixed order.
  sorted_key, queries, key_starts, key_ends = jax.lax.sort(
      (key, query_pos, first_key, last_key), dimension=2, is_stable=True, num_keys=1)
  bounds = jnp.arange(num_blocks + 1, dtype=jnp.int32)
  starts = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, bounds, side="left")))(
      sorted_key)
  return QueryLists(queries, starts.astype(jnp.int32), key_starts, key_ends)
