"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): pure math over n residual streams.

The stream is [..., n, D]. Each sublayer reads one input from it and writes its output back:

  mixes = (flat(x) . fn^T) * rsqrt(mean(flat(x)^2) + norm_eps)        flat(x): [..., n*D], fp32
  pre   = sigmoid(scale0 * mixes[:n]   + base[:n])   + eps            [..., n]  in (eps, 1+eps)
  post  = 2 * sigmoid(scale1 * mixes[n:2n] + base[n:2n])              [..., n]  in (0, 2)
  comb  = sinkhorn(softmax_rows(scale2 * mixes[2n:] + base[2n:]) + eps)  [..., n, n]
  input = sum_i pre_i x_i                     (the sublayer's pre-norm input, not normalised)
  out_j = post_j * f(input) + sum_i comb[i, j] x_i

`comb[i, j]` carries stream i into stream j (DeepSeek's reference sums over the first axis;
the matrix is doubly stochastic but not symmetric, so the direction matters). Before the head
the streams collapse with weights sigmoid(scale * mixes + base) + eps (the HyperHead).
"""

import jax
import jax.numpy as jnp


def weighted_mixes(streams: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
  """(flattened streams . fn^T) scaled by their weightless RMS: [..., n, D] -> [..., M] fp32
  for fn [M, n*D]."""
  flat = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)
  rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + norm_eps)
  return jnp.einsum("...K,MK->...M", flat, fn.astype(jnp.float32)) * rsqrt


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
  """DeepSeek's Sinkhorn projection of positive [..., n, n] matrices: one column
  normalisation, then iters - 1 rounds of (row, column) normalisation, each sum + eps."""
  def columns(c):
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  def round_(_, c):
    return columns(c / (jnp.sum(c, axis=-1, keepdims=True) + eps))

  return jax.lax.fori_loop(0, iters - 1, round_, columns(comb))


def connection_weights(mixes: jax.Array, base: jax.Array, scale: jax.Array, n: int,
                       iters: int, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(pre [..., n], post [..., n], comb [..., n, n]) from mixes [..., (2+n)n], fp32."""
  base, scale = base.astype(jnp.float32), scale.astype(jnp.float32)
  pre = jax.nn.sigmoid(scale[0] * mixes[..., :n] + base[:n]) + eps
  post = 2.0 * jax.nn.sigmoid(scale[1] * mixes[..., n:2 * n] + base[n:2 * n])
  logits = scale[2] * mixes[..., 2 * n:] + base[2 * n:]
  logits = logits.reshape(*logits.shape[:-1], n, n)
  comb = sinkhorn(jax.nn.softmax(logits, axis=-1) + eps, iters, eps)
  return pre, post, comb


def collapse(streams: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_i weights_i x_i: [..., n, D] with weights [..., n] -> [..., D] in the streams' dtype."""
  out = jnp.einsum("...n,...nD->...D", weights, streams.astype(jnp.float32))
  return out.astype(streams.dtype)


def write_back(streams: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array
               ) -> jax.Array:
  """out_j = post_j * out + sum_i comb[i, j] x_i: the streams [..., n, D] after a sublayer
  with output `out` [..., D], in the streams' dtype."""
  mixed = jnp.einsum("...ij,...iD->...jD", comb, streams.astype(jnp.float32))
  return (post[..., None] * out.astype(jnp.float32)[..., None, :] + mixed).astype(streams.dtype)


def head_weights(streams: jax.Array, fn: jax.Array, base: jax.Array, scale: jax.Array,
                 norm_eps: float, eps: float) -> jax.Array:
  """The HyperHead's stream weights sigmoid(scale * mixes + base) + eps [..., n]
  (fn [n, n*D], base [n], scale [1])."""
  mixes = weighted_mixes(streams, fn, norm_eps)
  return jax.nn.sigmoid(scale.astype(jnp.float32)[0] * mixes
                        + base.astype(jnp.float32)) + eps
