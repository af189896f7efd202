"""Projections as one 2-D matmul over all tokens.

`project(x, w, n)` contracts the last n axes of x with the first n axes of w. Leading (token)
axes are flattened to one row axis and w to a [K, F] matrix before the matmul, so that the
forward pass and both gradients are plain 2-D GEMMs. Written as an einsum over [B,T,...]
activations instead, XLA's CPU backend copies transposed activations before the
weight-gradient dots, which made the backward pass several times slower than the forward.
"""

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """x [..., K1..Kn] . w [K1..Kn, F1..Fm] -> [..., F1..Fm] (n = `contract`)."""
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  if w.shape[:contract] != inner:
    raise ValueError(f"project: x {x.shape} and w {w.shape} disagree on the {contract} "
                     "contracted axes.")
  out = w.shape[contract:]
  k = math.prod(inner)
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(*lead, *out)
