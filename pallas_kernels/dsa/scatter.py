"""The backward's scatter-add in XLA: per-row latent gradients into [B,S,...]."""

import jax
import jax.numpy as jnp


def scatter_rows(acc: jax.Array, rows: jax.Array, indices: jax.Array) -> jax.Array:
  """acc f32 [B,S,*F], rows [B,M,*F], indices int32 [B,M] (< 0: no key) -> acc with each
  row added at its index (a repeated index adds twice; the rows of -1 entries, which the
  kernels may leave unwritten, are dropped, never read into the sum)."""
  num_keys = acc.shape[1]
  indices = jnp.where(indices >= 0, indices, num_keys)  # out of bounds: dropped

  def one(acc, idx, upd):
    return acc.at[idx].add(upd.astype(acc.dtype), mode="drop")
  return jax.vmap(one)(acc, indices, rows)


def query_chunking(seq_len: int, step: int, wanted: int) -> tuple[int, int]:
  """(chunk, padded length): the backward's queries per kernel call, `wanted` rounded down
  to a multiple of the kernel's `step` (at least one step, at most the padded sequence),
  and T padded to whole chunks."""
  steps = -(-seq_len // step)
  chunk = step * max(1, min(wanted // step, steps))
  return chunk, -(-seq_len // chunk) * chunk
