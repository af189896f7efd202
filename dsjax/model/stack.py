"""A stack of identical blocks with parameters stacked on a leading `layers` axis, run with
jax.lax.scan (or unrolled, for tests and debugging) under a remat policy."""

import jax
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.block import Block
from dsjax.model.param import AXES

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _prepend_layers_axis(module: nnx.Module) -> None:
  for _, variable in nnx.iter_graph(module):
    if isinstance(variable, nnx.Variable) and AXES in variable.get_metadata():
      variable.set_metadata(AXES, ("layers",) + tuple(variable.get_metadata()[AXES]))


class LayerStack(nnx.Module):
  """`num_layers` Blocks; x [B,T,D] -> (x, per-layer Routing stacked on axis 0 or None)."""

  def __init__(self, cfg: ModelConfig, use_moe: bool, num_layers: int, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
    def create(layer_rngs: nnx.Rngs) -> Block:
      return Block(cfg, use_moe, rngs=layer_rngs)

    self.blocks = create(rngs)
    _prepend_layers_axis(self.blocks)
    self.num_layers = num_layers
    self.scan = cfg.scan_layers
    self.remat_policy = cfg.remat_policy

  def __call__(self, x, cos, sin, mask, moe_impl: str | None = None, scan: bool | None = None):
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, moe_impl)

    if self.remat_policy != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat_policy])
    if self.scan if scan is None else scan:
      return jax.lax.scan(body, x, state)
    outputs = []
    for i in range(self.num_layers):
      x, out = body(x, jax.tree.map(lambda a, i=i: a[i], state))
      outputs.append(out)
    return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *outputs)
