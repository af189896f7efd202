"""A stack: one repeating period of layers (a Block, or a LayerGroup of several) with
parameters stacked on a leading `layers` axis, run with jax.lax.scan (or unrolled, for tests
and debugging) under a remat policy. See dsjax.model.pattern for how a model's layers are
grouped into stacks."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.block import Block, LayerGroup, write_caches
from dsjax.model.latent_cache import LatentCache
from dsjax.model.param import AXES
from dsjax.model.pattern import LayerRun
from dsjax.model.residual import constrain_stream

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _prepend_layers_axis(module: nnx.Module) -> None:
  for _, variable in nnx.iter_graph(module):
    if isinstance(variable, nnx.Variable) and AXES in variable.get_metadata():
      variable.set_metadata(AXES, ("layers",) + tuple(variable.get_metadata()[AXES]))


@jax.tree_util.register_pytree_node_class
class PerLayer:
  """A stacked parameter held as one array per layer (the inference layout, see
  `unstack_layers`). An unrolled stack hands layer i its own buffer, where slicing [L,...]
  weights by layer (scanned or unrolled) makes XLA copy every layer's weights on every call:
  in decoding, where each step reads every weight once, that copy is most of the step."""

  def __init__(self, arrays):
    self.arrays = tuple(arrays)

  def tree_flatten(self):
    return self.arrays, None

  @classmethod
  def tree_unflatten(cls, _, arrays):
    return cls(arrays)


def _is_per_layer(a) -> bool:
  return isinstance(a, PerLayer)


def layer_slice(tree, i: int):
  """Layer i of a tree of stacked [L,...] arrays and PerLayer parameters."""
  return jax.tree.map(lambda a: a.arrays[i] if _is_per_layer(a) else a[i], tree,
                      is_leaf=_is_per_layer)


def per_layer(a: jax.Array) -> PerLayer:
  """A stacked [L,...] array (or an abstract one) as L arrays."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return PerLayer(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for _ in range(a.shape[0]))
  return PerLayer(a[i] for i in range(a.shape[0]))


def unstack_layers(state: nnx.State) -> nnx.State:
  """A model state (nnx.split) whose layer stacks' [L,...] parameters are PerLayer arrays:
  the layout for decoding, where every step reads all weights once (see PerLayer). Stacks
  with this layout run unrolled; train with the stacked layout."""
  def unstack(path, a):
    in_stack = "blocks" in [getattr(k, "key", None) for k in path]
    return per_layer(a) if in_stack else a
  return jax.tree_util.tree_map_with_path(unstack, state)


def cache_slots(cache) -> int:
  """Slots S of a layer or stack cache (stacked [L,B,S,...] or PerLayer [B,S,...] per layer)."""
  return cache.slots


def write_slots(cache: LatentCache, new: LatentCache, positions: jax.Array) -> LatentCache:
  """`cache` [L,B,S,...] with new [L,B,T,...] written at slots positions int[B,T]."""
  return cache.write(new, positions)


def pad_slots(cache, slots: int, offset: int = 0):
  """A cache of T tokens ([L,]B,T,...) placed at slots offset..offset+T-1 of a zero cache
  with `slots` slots (None stays None); NSA caches are built at their final size instead."""
  return None if cache is None else cache.padded(slots, offset)


def _has_per_layer(tree) -> bool:
  return any(map(_is_per_layer, jax.tree.leaves(tree, is_leaf=_is_per_layer)))


def per_layer_cache(cache):
  """A stack's cache (stacked [L,...] arrays) as PerLayer buffers."""
  return jax.tree.map(per_layer, cache)


class LayerStack(nnx.Module):
  """The `run.repeats` repetitions of `run.period`; x [B,T,D] -> (x, per-layer auxiliary
  outputs stacked on axis 0: Routing for MoE layers, None for dense; a tuple per period slot
  for periods of several layers)."""

  def __init__(self, cfg: ModelConfig, run: LayerRun, *, rngs: nnx.Rngs):
    period = run.period

    @nnx.split_rngs(splits=run.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=run.repeats)
    def create(layer_rngs: nnx.Rngs):
      if len(period) == 1:
        return Block(cfg, period[0], rngs=layer_rngs)
      return LayerGroup(cfg, period, rngs=layer_rngs)

    self.blocks = create(rngs)
    _prepend_layers_axis(self.blocks)
    self.num_layers = run.repeats
    self.scan = cfg.scan_layers
    self.remat_policy = cfg.remat_policy

  def __call__(self, x, ctx, options):
    return self._run(lambda block, h: block(h, ctx, options), x, options.scan)

  def prefill(self, x, ctx, options, lengths=None, slots: int | None = None):
    """(x, aux, the stack's decode cache: each layer's, stacked [L,...], with `slots` slots
    (default T) for rows of `lengths` int[B] (default T))."""
    def layer(block, h):
      h, aux, cache = block.prefill(h, ctx, options, lengths, slots)
      return h, (aux, cache)
    x, (aux, cache) = self._run(layer, x, options.scan)
    return x, aux, cache

  def decode(self, x, ctx, cache, options):
    """T new tokens x [B,T,D] at ctx.tokens.positions through every layer.

    Stacked caches: the layers only read the cache (MLA's latents, NSA's selection keys and
    values) and return their updates; each layer cache's `write` stores the new tokens'
    entries of all layers at once, after the last layer (one in-place scatter when the cache
    buffer is donated). PerLayer caches: see _decode_per_layer."""
    if _has_per_layer(cache):
      return self._decode_per_layer(x, ctx, cache, options)
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer):
      layer_state, layer_cache = layer
      return nnx.merge(graphdef, layer_state).decode(h, ctx, layer_cache, options)

    x, update = self._scan_layers(body, x, (state, cache), options.scan)
    return x, write_caches(cache, update, ctx.tokens.positions)

  def _decode_per_layer(self, x, ctx, cache, options):
    """LayerStack.decode over a cache of PerLayer buffers, unrolled (Block.decode_in_place):
    each layer first writes the new tokens' entries into its own buffers (in place, the cache
    being donated) and then attends over them. Reading a buffer that is written later in the
    step, as the stacked path does, makes XLA copy it."""
    graphdef, state = nnx.split(self.blocks)
    after = []
    for i in range(self.num_layers):
      block = nnx.merge(graphdef, layer_slice(state, i))
      x, layer_cache = block.decode_in_place(x, ctx, layer_slice(cache, i), options)
      after.append(layer_cache)
    return x, jax.tree.map(lambda *layers: PerLayer(layers), *after)

  def _scan_layers(self, body, x, layers, scan: bool | None):
    """body(h, one layer's slice of `layers`) -> (h, out) over the layers, scanned or
    unrolled (always unrolled with PerLayer parameters); outs stacked on axis 0."""
    unstacked = _has_per_layer(layers)
    inner = body

    def body(h, layer):  # the residual stream keeps its batch split across layers
      h, out = inner(constrain_stream(h), layer)
      return constrain_stream(h), out

    if (self.scan if scan is None else scan) and not unstacked:
      return jax.lax.scan(body, x, layers)
    outputs = []
    for i in range(self.num_layers):
      x, out = body(x, layer_slice(layers, i))
      outputs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)

  def _run(self, layer_fn, x, scan: bool | None):
    """Runs `layer_fn(block, h) -> (h, per-layer outputs)` over the layers (scanned or
    unrolled, under the remat policy); per-layer outputs are stacked on axis 0."""
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      return layer_fn(nnx.merge(graphdef, layer_state), h)

    if self.remat_policy != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat_policy])
    return self._scan_layers(body, x, state, scan)
