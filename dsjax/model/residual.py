"""The residual stream: how a block's sublayers read it and write back to it.

`PlainResidual` is the pre-norm residual of V2/V3 (a stream of one [B,T,D] array): a sublayer
reads the stream and adds its output to it. A residual with several streams (V4's mHC) keeps
the same four methods: `expand` before the first layer, `read` / `write` around each sublayer,
`reduce` after the last layer.
"""

import jax
from flax import nnx


class PlainResidual(nnx.Module):
  """x + sublayer(norm(x))."""

  def expand(self, x: jax.Array) -> jax.Array:
    """The embedded tokens [B,T,D] -> the stream."""
    return x

  def read(self, stream: jax.Array) -> jax.Array:
    """The sublayer's input [B,T,D]."""
    return stream

  def write(self, stream: jax.Array, out: jax.Array) -> jax.Array:
    """The stream after a sublayer with output `out` [B,T,D]."""
    return stream + out

  def reduce(self, stream: jax.Array) -> jax.Array:
    """The stream -> the final hidden state [B,T,D] (before the final norm)."""
    return stream
