"""A stack of identical blocks with parameters stacked on a leading `layers` axis, run with
jax.lax.scan (or unrolled, for tests and debugging) under a remat policy."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.block import Block
from dsjax.model.param import AXES
from dsjax.ops.latent_attention import KeySegment
from dsjax.ops.nsa_decode import NSACache, write_selection_slots
from dsjax.ops.slots import write_at_slots
from dsjax.parallel.activations import TOKENS, constrain

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


class LatentCache(NamedTuple):
  """The decode cache of a stack of MLA layers: normalised c_kv [L,B,S,C] and rotated shared
  rope keys k_pe [L,B,S,R] (or both PerLayer, L arrays [B,S,...]: the per-layer layout, see
  LayerStack.decode); slot s holds the token at position s."""
  c_kv: jax.Array
  k_pe: jax.Array


def cache_slots(cache: LatentCache) -> int:
  """Slots S of a LatentCache, stacked [L,B,S,C] or PerLayer [B,S,C] per layer."""
  c = cache.c_kv
  return c.arrays[0].shape[1] if _is_per_layer(c) else c.shape[2]


def write_slots(cache: LatentCache, new: LatentCache, positions: jax.Array) -> LatentCache:
  """`cache` [L,B,S,...] with new [L,B,T,...] written at slots positions int[B,T]."""
  return LatentCache(*(write_at_slots(c, n, positions) for c, n in zip(cache, new)))


def pad_slots(cache: LatentCache | None, slots: int, offset: int = 0) -> LatentCache | None:
  """A LatentCache [L,B,T,...] placed at slots offset..offset+T-1 of a zero cache with `slots`
  slots."""
  if cache is None:
    return None
  if isinstance(cache, NSACache):
    raise ValueError("An NSA decode cache holds per-row state (compressed blocks, rings) that "
                     "padding cannot place; build it at its final size with "
                     "Transformer.prefill(ids, lengths=..., slots=...).")
  t = cache.c_kv.shape[2]
  if offset + t > slots:
    raise ValueError(f"{offset + t} cache entries do not fit in {slots} slots.")
  widths = ((0, 0), (0, 0), (offset, slots - offset - t), (0, 0))
  return LatentCache(*(jnp.pad(a, widths) for a in cache))


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
    return self._run(lambda block, h: block(h, cos, sin, mask, moe_impl), x, scan)

  def prefill(self, x, cos, sin, mask, moe_impl: str | None = None, scan: bool | None = None,
              lengths=None, slots: int | None = None):
    """(x, routing, the stack's decode cache): MLA, a LatentCache of the T tokens (c_kv
    [L,B,T,C], k_pe [L,B,T,R]), padded to `slots` slots when given; NSA, an NSACache [L,B,...]
    with `slots` slots (default T) for rows of `lengths` int[B] (default T)."""
    def layer(block, h):
      h, routing, cache = block.prefill(h, cos, sin, mask, moe_impl, lengths, slots)
      return h, (routing, cache)
    x, (routing, cache) = self._run(layer, x, scan)
    if isinstance(cache, NSACache):
      return x, routing, cache
    cache = LatentCache(*cache)
    return x, routing, cache if slots is None else pad_slots(cache, slots)

  def decode(self, x, cos, sin, cache: LatentCache | NSACache, positions, cache_mask=None,
             new_mask=None, attn_impl: str = "absorb", moe_impl: str | None = None,
             scan: bool | None = None) -> tuple[jax.Array, LatentCache | NSACache]:
    """T new tokens x [B,T,D] at `positions` int[B,T] through every layer.

    MLA (`cache` a LatentCache): each layer attends over its cache slots (`cache_mask`
    [B,1,T,S]) and the new tokens (`new_mask` [B,1,T,T]). NSA (`cache` an NSACache): each layer
    reads its decode state and returns its compressed state and rings after the step.
    Stacked caches: the layers only read the per-token cache (MLA's latents, NSA's selection
    keys/values); the new tokens' entries of all layers are written to slots `positions`
    once, after the last layer (one in-place scatter when the cache buffer is donated).
    PerLayer caches: see _decode_per_layer."""
    if _is_per_layer(cache[0]):
      return self._decode_per_layer(x, cos, sin, cache, positions, attn_impl, moe_impl)
    graphdef, state = nnx.split(self.blocks)
    if isinstance(cache, NSACache):
      def body(h, layer):
        layer_state, layer_cache = layer
        return nnx.merge(graphdef, layer_state).decode(
            h, cos, sin, layer_cache, moe_impl=moe_impl, positions=positions)
      x, update = self._scan_layers(body, x, (state, cache), scan)
      return x, write_selection_slots(cache, update, positions)

    def body(h, layer):
      layer_state, c_kv, k_pe = layer
      return nnx.merge(graphdef, layer_state).decode(
          h, cos, sin, KeySegment(c_kv, k_pe, cache_mask), new_mask, attn_impl, moe_impl)

    x, (new_c, new_pe) = self._scan_layers(body, x, (state, cache.c_kv, cache.k_pe), scan)
    return x, write_slots(cache, LatentCache(new_c, new_pe), positions)

  def _decode_per_layer(self, x, cos, sin, cache: LatentCache | NSACache, positions,
                        attn_impl, moe_impl):
    """LayerStack.decode over a cache of PerLayer buffers, unrolled (Block.decode_in_place):
    each layer first writes the new tokens' entries into its own buffers (in place, the cache
    being donated) and then attends over them. Reading a buffer that is written later in the
    step, as the stacked path does, makes XLA copy it."""
    graphdef, state = nnx.split(self.blocks)
    mask = None
    if isinstance(cache, LatentCache):  # every slot up to the query's position
      mask = (jnp.arange(cache_slots(cache)) <= positions[:, :, None])[:, None]
    after = []
    for i in range(self.num_layers):
      block = nnx.merge(graphdef, layer_slice(state, i))
      x, layer_cache = block.decode_in_place(x, cos, sin, layer_slice(cache, i), positions, mask,
                                             attn_impl, moe_impl)
      after.append(layer_cache)
    return x, type(cache)(*(PerLayer(field) for field in zip(*after)))

  def _scan_layers(self, body, x, layers, scan: bool | None):
    """body(h, one layer's slice of `layers`) -> (h, out) over the layers, scanned or
    unrolled (always unrolled with PerLayer parameters); outs stacked on axis 0."""
    unstacked = any(map(_is_per_layer, jax.tree.leaves(layers, is_leaf=_is_per_layer)))
    inner = body

    def body(h, layer):  # the residual stream keeps its batch split across layers
      h, out = inner(constrain(h, TOKENS), layer)
      return constrain(h, TOKENS), out

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

