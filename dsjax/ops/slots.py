"""Writing the new tokens' decode-cache entries at their slots."""

import jax
import jax.numpy as jnp


def write_at_slots(buffer: jax.Array, new: jax.Array, positions: jax.Array,
                   feature_dims: int = 1) -> jax.Array:
  """buffer [..., B, S, *F] with new [..., B, T, *F] written at slots positions int[B,T]
  (len(F) = feature_dims; the leading axes, e.g. a stack's layers, are kept). One in-place
  scatter when the buffer is donated and not read after the write."""
  rows = jnp.arange(positions.shape[0])[:, None]
  index = (Ellipsis, rows, positions) + (slice(None),) * feature_dims
  return buffer.at[index].set(new.astype(buffer.dtype))
