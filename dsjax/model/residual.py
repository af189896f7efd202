"""The residual stream: how a block's sublayers read it and write back to it.

Two pieces, one per place: the model's stream (`expand` the embedded tokens before the first
layer, `reduce` it to the final hidden state after the last) and each sublayer's connection
(`read` the sublayer's input and a carry, `write` its output back with that carry).
`PlainResidual` is the pre-norm residual of V2/V3 (one [B,T,D] array: x + sublayer(norm(x)));
mHC's n streams (dsjax.model.hyper_connections) implement the same methods with parameters.
`model_residual` / `sublayer_residual` pick them from ModelConfig.mhc.
"""

import jax
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.hyper_connections import HyperConnection, HyperHead
from dsjax.parallel.activations import STREAMS, TOKENS, constrain


class PlainResidual(nnx.Module):
  """x + sublayer(norm(x)): the stream and the connection are the same [B,T,D] array."""

  def expand(self, x: jax.Array) -> jax.Array:
    """The embedded tokens [B,T,D] -> the stream."""
    return x

  def read(self, stream: jax.Array) -> tuple[jax.Array, None]:
    """(the sublayer's input [B,T,D], the carry `write` needs)."""
    return stream, None

  def write(self, stream: jax.Array, out: jax.Array, carry=None) -> jax.Array:
    """The stream after a sublayer with output `out` [B,T,D]."""
    del carry
    return stream + out

  def reduce(self, stream: jax.Array) -> jax.Array:
    """The stream -> the final hidden state [B,T,D] (before the final norm)."""
    return stream


def model_residual(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The module that expands the embedded tokens into the stream and reduces it at the end."""
  if cfg.mhc is None:
    return PlainResidual()
  return HyperHead(cfg, rngs=rngs)


def sublayer_residual(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The connection of one sublayer (attention or feed-forward) to the stream."""
  if cfg.mhc is None:
    return PlainResidual()
  return HyperConnection(cfg, rngs=rngs)


def constrain_stream(stream: jax.Array) -> jax.Array:
  """The stream kept split over the batch axes: [B,T,D], or mHC's [B,T,n,D]."""
  return constrain(stream, STREAMS if stream.ndim == 4 else TOKENS)
