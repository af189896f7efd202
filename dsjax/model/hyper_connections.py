"""mHC (manifold-constrained hyper-connections, DeepSeek-V4) as a residual-stream kind.

The embedded tokens are copied into n streams [B,T,n,D]; each sublayer has a `HyperConnection`
(fp32 fn [(2+n)n, nD], base [(2+n)n], scale [3]) that reads its input as a gated sum of the
streams and writes its output back through a doubly-stochastic mixing of them; a `HyperHead`
(fn [n, nD], base [n], scale [1]) weights the streams into the final hidden state. The math is
dsjax.ops.hyper_connections; the interface is dsjax.model.residual's.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.param import AXES, normal_param, ones_param
from dsjax.ops import hyper_connections as hc


def _zeros(shape) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), **{AXES: (None,) * len(shape)})


class HyperConnection(nnx.Module):
  """One sublayer's connection to the n streams: `read` -> (input [B,T,D], (post, comb)),
  `write` -> the streams after the sublayer. Parameters stay fp32 (as DeepSeek keeps them);
  the gates' scales start at mhc.init_scale, so training starts from the static bases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n, mhc = cfg.mhc.hc_mult, cfg.mhc
    size = (2 + n) * n
    self.fn = normal_param(rngs, (size, n * cfg.hidden_size), (None, None),
                           cfg.initializer_range, jnp.float32)
    self.base = _zeros((size,))
    self.scale = nnx.Param(jnp.full((3,), mhc.init_scale, jnp.float32), **{AXES: (None,)})
    self.hc_mult, self.iters, self.eps, self.norm_eps = n, mhc.sinkhorn_iters, mhc.eps, \
        cfg.rms_norm_eps

  def weights(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pre [B,T,n], post [B,T,n], comb [B,T,n,n]) of `streams` [B,T,n,D], fp32."""
    mixes = hc.weighted_mixes(streams, self.fn[...], self.norm_eps)
    return hc.connection_weights(mixes, self.base[...], self.scale[...], self.hc_mult,
                                 self.iters, self.eps)

  def read(self, streams: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pre, post, comb = self.weights(streams)
    return hc.collapse(streams, pre), (post, comb)

  def write(self, streams: jax.Array, out: jax.Array, carry) -> jax.Array:
    post, comb = carry
    return hc.write_back(streams, out, post, comb)


class HyperHead(nnx.Module):
  """The model's n streams: `expand` copies the embedded tokens into them, `reduce` weights
  them into the final hidden state (DeepSeek's hc_head)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.mhc.hc_mult
    self.fn = normal_param(rngs, (n, n * cfg.hidden_size), (None, None),
                           cfg.initializer_range, jnp.float32)
    self.base = _zeros((n,))
    self.scale = ones_param((1,), (None,), jnp.float32)
    self.hc_mult, self.eps, self.norm_eps = n, cfg.mhc.eps, cfg.rms_norm_eps

  def expand(self, x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], self.hc_mult, x.shape[-1]))

  def reduce(self, streams: jax.Array) -> jax.Array:
    pre = hc.head_weights(streams, self.fn[...], self.base[...], self.scale[...],
                          self.norm_eps, self.eps)
    return hc.collapse(streams, pre)
