"""One pre-norm decoder layer: the residual stream through an attention kind, then through a
feed-forward kind (both looked up by the layer's LayerSpec in dsjax.model.kinds)."""

from typing import Any, NamedTuple

import jax
from flax import nnx

from dsjax.config import LayerSpec, ModelConfig
from dsjax.model.kinds import TokenContext, attention_kind, ffn_kind
from dsjax.model.norm import RMSNorm
from dsjax.model.residual import sublayer_residual


class ModelContext(NamedTuple):
  """What a forward or decode pass hands every layer: the tokens and, per attention kind name,
  that kind's context (built once per pass, see AttentionKind.context / decode_context)."""
  tokens: TokenContext
  attention: dict[str, Any]


class LayerAux(NamedTuple):
  """A layer's auxiliary outputs: its feed-forward's (Routing for MoE layers, else None) and
  its attention's training losses ({name: float32 scalar}, see AttentionKind.attend_with_loss,
  else None)."""
  routing: Any = None
  attention: dict | None = None


class Block(nnx.Module):
  """x -> x + attn(attn_norm(x)) -> x + ffn(ffn_norm(x)), each sublayer through its own
  connection to the residual stream (dsjax.model.residual: plain, or mHC's streams)."""

  def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.param_dtype)
    self.attn = attention_kind(spec.attention).create(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.param_dtype)
    self.ffn = ffn_kind(spec.ffn).create(cfg, rngs=rngs)
    self.attn_residual = sublayer_residual(cfg, rngs=rngs)
    self.ffn_residual = sublayer_residual(cfg, rngs=rngs)
    self.attention_name = spec.attention

  def __call__(self, x, ctx: ModelContext, options) -> tuple[jax.Array, LayerAux]:
    """(x, the layer's LayerAux)."""
    inputs, carry = self._attn_input(x)
    h, losses = self.attn.attend_with_loss(inputs, self._attn_ctx(ctx), options)
    x, routing = self._ffn(self.attn_residual.write(x, h, carry), ctx, options)
    return x, LayerAux(routing, losses)

  def prefill(self, x, ctx: ModelContext, options, lengths=None, slots: int | None = None):
    """(x, LayerAux (routing only), the layer's decode cache with `slots` slots for rows of
    `lengths`)."""
    inputs, carry = self._attn_input(x)
    h, cache = self.attn.attend_prefill(inputs, self._attn_ctx(ctx), options, lengths, slots)
    x, routing = self._ffn(self.attn_residual.write(x, h, carry), ctx, options)
    return x, LayerAux(routing), cache

  def decode(self, x, ctx: ModelContext, cache, options):
    """(x, the layer's cache update): reads `cache`, the caller writes the update."""
    inputs, carry = self._attn_input(x)
    h, update = self.attn.attend_decode(inputs, self._attn_ctx(ctx), cache,
                                        ctx.tokens.positions, options)
    return self._ffn(self.attn_residual.write(x, h, carry), ctx, options)[0], update

  def decode_in_place(self, x, ctx: ModelContext, cache, options):
    """(x, the layer's cache after the step, the new tokens written before attention)."""
    inputs, carry = self._attn_input(x)
    h, cache = self.attn.attend_decode_in_place(inputs, self._attn_ctx(ctx), cache,
                                                ctx.tokens.positions, options)
    return self._ffn(self.attn_residual.write(x, h, carry), ctx, options)[0], cache

  def _attn_input(self, x):
    """(attn_norm of the attention's read of the stream, the carry its write needs)."""
    inputs, carry = self.attn_residual.read(x)
    return self.attn_norm(inputs), carry

  def _attn_ctx(self, ctx: ModelContext):
    return ctx.attention[self.attention_name]

  def _ffn(self, x, ctx: ModelContext, options):
    inputs, carry = self.ffn_residual.read(x)
    h, aux = self.ffn.feed_forward(self.ffn_norm(inputs), ctx.tokens, options)
    return self.ffn_residual.write(x, h, carry), aux


class LayerGroup(nnx.Module):
  """A period of different layers run in order, as one unit of a scanned stack; its caches
  and auxiliary outputs are tuples with one entry per layer."""

  def __init__(self, cfg: ModelConfig, period: tuple[LayerSpec, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List([Block(cfg, spec, rngs=rngs) for spec in period])

  def __call__(self, x, ctx, options):
    aux = []
    for layer in self.layers:
      x, a = layer(x, ctx, options)
      aux.append(a)
    return x, tuple(aux)

  def prefill(self, x, ctx, options, lengths=None, slots=None):
    aux, caches = [], []
    for layer in self.layers:
      x, a, cache = layer.prefill(x, ctx, options, lengths, slots)
      aux.append(a)
      caches.append(cache)
    return x, tuple(aux), tuple(caches)

  def decode(self, x, ctx, cache, options):
    return self._each(lambda layer, x, c: layer.decode(x, ctx, c, options), x, cache)

  def decode_in_place(self, x, ctx, cache, options):
    return self._each(lambda layer, x, c: layer.decode_in_place(x, ctx, c, options), x, cache)

  def _each(self, step, x, caches):
    out = []
    for layer, cache in zip(self.layers, caches):
      x, c = step(layer, x, cache)
      out.append(c)
    return x, tuple(out)


def is_group_tuple(value) -> bool:
  """A LayerGroup's per-layer tuple (a plain tuple, not a cache or Routing NamedTuple)."""
  return type(value) is tuple


def write_caches(cache, update, positions):
  """A stack's caches after the stacked decode path: each layer cache's own write."""
  if is_group_tuple(cache):
    return tuple(write_caches(c, u, positions) for c, u in zip(cache, update))
  return cache.write(update, positions)


def flatten_aux(aux) -> list[LayerAux]:
  """The LayerAux of a layer or stack (arrays stacked per layer) or of a group's slots, in
  layer order."""
  if is_group_tuple(aux):
    return [a for item in aux for a in flatten_aux(item)]
  return [aux]
