"""The inverse of block_indices, for the dk/dv kernels: for each key block, the queries that
selected it.

Sorting the (query, slot) pairs of a kv head by the block they selected is the same move as
sorting tokens by expert in a dropless MoE: each key block then owns one contiguous run of
query positions, so a dk/dv kernel program per key block walks its run and writes its own
rows once, with no scatter and no atomics.
"""

import jax
import jax.numpy as jnp


def selects_block(block_indices: jax.Array, block_size: int, query_pos) -> jax.Array:
  """Whether an entry of block_indices names a block with at least one allowed key for its
  query: j >= 0 and j*l' <= t (then the block's first token is allowed; j < cdiv(T, l')
  follows from t < T). Entries that fail it contribute nothing and are skipped."""
  return (block_indices >= 0) & (block_indices * block_size <= query_pos)


def block_query_lists(block_indices: jax.Array, block_size: int, num_blocks: int):
  """block_indices [B,T,H,S] -> (queries int32 [B,H,T*S], starts int32 [B,H,num_blocks+1]).

  queries[b, h, starts[b,h,j] : starts[b,h,j+1]] are the query positions t (ascending) whose
  row selects key block j. Entries past starts[b,h,num_blocks] are the skipped pairs
  (-1, or a block wholly after t) and are never read as a list.
  """
  b, t, h, s = block_indices.shape
  idx = jnp.transpose(block_indices.astype(jnp.int32), (0, 2, 1, 3)).reshape(b, h, t * s)
  query_pos = jnp.broadcast_to(jnp.repeat(jnp.arange(t, dtype=jnp.int32), s), idx.shape)
  key = jnp.where(selects_block(idx, block_size, query_pos), idx, num_blocks)
  # A stable sort keeps each block's queries ascending, so dk/dv sum in a fixed order.
  sorted_key, queries = jax.lax.sort((key, query_pos), dimension=2, is_stable=True,
                                     num_keys=1)
  bounds = jnp.arange(num_blocks + 1, dtype=jnp.int32)
  starts = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, bounds, side="left")))(
      sorted_key)
  return queries, starts.astype(jnp.int32)
