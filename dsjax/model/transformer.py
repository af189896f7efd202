"""dsjax.Transformer: embedding -> layer stacks (dsjax.model.pattern) -> norm -> head (+ MTP
modules)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.block import ModelContext, flatten_aux
from dsjax.model.kinds import TokenContext, attention_kind
from dsjax.model.mtp import MTPModule
from dsjax.model.norm import RMSNorm
from dsjax.model.options import RunOptions, run_options
from dsjax.model.param import normal_param
from dsjax.model.pattern import layer_runs
from dsjax.model.residual import model_residual
from dsjax.model.stack import LayerStack
from dsjax.ops.routing import Routing
from dsjax.ops.linear import project
from dsjax.parallel.activations import LOGITS, TOKENS, constrain


class ModelOutput(NamedTuple):
  """logits [B,T,V]; hidden [B,T,D] (final, normalised); routing of the MoE layers stacked as
  [L_moe, B*T, ...] in dsjax.model.pattern.routed_rows order (None without MoE layers);
  attention_losses: each attention training loss by name (AttentionKind.attend_with_loss),
  float32 [layers that have it] (empty without any)."""
  logits: jax.Array
  hidden: jax.Array
  routing: Routing | None
  attention_losses: dict = {}


class MTPOutput(NamedTuple):
  """One MTP depth's logits [B,T-k,V], routing [1,B*(T-k),...] (None without MoE) and
  attention losses (as ModelOutput's, [1] per name)."""
  logits: jax.Array
  routing: Routing | None
  attention_losses: dict


class DecodeCache(NamedTuple):
  """layers: each stack's decode cache by stack name (whatever its layers' attention kinds
  return: MLA's LatentCache, NSA's NSACache, stacked [L,...]; a tuple of them for a stack
  whose period has several layers); mtp: the first MTP module's cache [1,...] or None."""
  layers: dict
  mtp: object = None

  def __getattr__(self, name: str):
    """cache.dense / cache.moe: the cache of the stack "dense_layers" / "moe_layers"."""
    if not name.startswith("_") and f"{name}_layers" in self.layers:
      return self.layers[f"{name}_layers"]
    raise AttributeError(f"DecodeCache has no stack {name!r}; stacks: {sorted(self.layers)}")

  def padded(self, slots: int) -> "DecodeCache":
    """Every stack's cache of T tokens placed at slots 0..T-1 of a cache with `slots` slots
    (the MTP cache as it is)."""
    def pad(c):
      return tuple(map(pad, c)) if type(c) is tuple else c.padded(slots)
    return self._replace(layers={name: pad(c) for name, c in self.layers.items()})

  @property
  def slots(self) -> int:
    first = next(iter(self.layers.values()))
    while type(first) is tuple:
      first = first[0]
    return first.slots


def _concat(items: list):
  if not items:
    return None
  return jax.tree.map(lambda *a: jnp.concatenate(a), *items) if len(items) > 1 else items[0]


def _routing(aux: list) -> Routing | None:
  return _concat([a.routing for a in aux if a.routing is not None])


def _attention_losses(aux: list) -> dict:
  """{name: float32 [layers]} from the layers' LayerAux (scalars, or [L] for a stack)."""
  losses = {}
  for a in aux:
    for name, value in (a.attention or {}).items():
      losses.setdefault(name, []).append(jnp.reshape(value, (-1,)))
  return {name: jnp.concatenate(values) for name, values in losses.items()}


class Transformer(nnx.Module):
  """A DeepSeek-family decoder. `model(input_ids int32[B,T]) -> logits float[B,T,V]`."""

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"head": (0, 1)}

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, std, pdt = cfg.hidden_size, cfg.initializer_range, cfg.param_dtype
    self.config = cfg
    self.embed = normal_param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), std, pdt)
    self.residual = model_residual(cfg, rngs=rngs)
    runs = layer_runs(cfg)
    for run in runs:  # attributes named by the stacks: dense_layers, moe_layers, ...
      setattr(self, run.name, LayerStack(cfg, run, rngs=rngs))
    self.stack_names = tuple(run.name for run in runs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps, "embed", pdt)
    self.head = nnx.data(None if cfg.tie_word_embeddings
                         else normal_param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), std, pdt))
    self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])

  # ---- pieces ----
  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.config.dtype)
    return constrain(x, TOKENS)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    head = self.embed[...].T if self.head is None else self.head[...]
    logits = project(hidden, head.astype(self.config.dtype))
    return constrain(logits, LOGITS) if logits.ndim == 3 else logits

  def stacks(self) -> list[LayerStack]:
    return [getattr(self, name) for name in self.stack_names]

  def _attention_kinds(self) -> list[str]:
    cfg = self.config
    names = [s.attention for s in cfg.layer_specs]
    if cfg.num_mtp_layers:
      names.append(cfg.mtp_spec.attention)
    return sorted(set(names))

  def _context(self, tokens: TokenContext) -> ModelContext:
    """Each attention kind's per-sequence context, built once for all its layers."""
    return ModelContext(tokens, {name: attention_kind(name).context(self.config, tokens)
                                 for name in self._attention_kinds()})

  def _decode_context(self, tokens: TokenContext, slots: int, first_slot: int = 0
                      ) -> ModelContext:
    return ModelContext(tokens, {
        name: attention_kind(name).decode_context(self.config, tokens.positions, slots,
                                                  first_slot)
        for name in self._attention_kinds()})

  @staticmethod
  def default_positions(input_ids: jax.Array) -> jax.Array:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def _final(self, x) -> tuple[jax.Array, jax.Array]:
    hidden = self.norm(self.residual.reduce(x))
    return self.logits_from_hidden(hidden), hidden

  # ---- forward passes ----
  def forward(self, input_ids: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None, moe_impl: str | None = None,
              scan: bool | None = None, *, options: RunOptions | None = None) -> ModelOutput:
    """Full forward pass with hidden states and routing. positions int[B,T] default to
    0..T-1; segment_ids int[B,T] (0 = padding) restrict attention to one packed sequence.
    `options` (dsjax.model.options.RunOptions) replaces moe_impl / scan when given."""
    self._check_input(input_ids)
    options = options or run_options(moe_impl, scan=scan)
    positions = self.default_positions(input_ids) if positions is None else positions
    ctx = self._context(TokenContext(input_ids, positions, segment_ids))
    x = self.residual.expand(self.embed_tokens(input_ids))
    aux = []
    for stack in self.stacks():
      x, stack_aux = stack(x, ctx, options)
      aux += flatten_aux(stack_aux)
    logits, hidden = self._final(x)
    return ModelOutput(logits, hidden, _routing(aux), _attention_losses(aux))

  def prefill(self, input_ids: jax.Array, positions: jax.Array | None = None,
              moe_impl: str | None = None, scan: bool | None = None,
              lengths: jax.Array | None = None, slots: int | None = None, *,
              options: RunOptions | None = None) -> tuple[ModelOutput, DecodeCache]:
    """forward() that also returns each stack's decode cache of these T tokens (mtp None),
    with `slots` slots (default T; slot t = token t). lengths int[B]: each row's prompt
    length (default T; the tokens after it are padding). MLA caches are the tokens' latents
    (they do not depend on `lengths`); NSA caches are the layers' decode state, whose rings
    hold each row's last positions before its length."""
    self._check_input(input_ids)
    if slots is not None and slots < input_ids.shape[1]:
      raise ValueError(f"slots={slots} cannot hold the {input_ids.shape[1]} prompt tokens; "
                       f"use slots >= {input_ids.shape[1]}.")
    options = options or run_options(moe_impl, scan=scan)
    positions = self.default_positions(input_ids) if positions is None else positions
    ctx = self._context(TokenContext(input_ids, positions))
    x = self.residual.expand(self.embed_tokens(input_ids))
    aux, caches = [], {}
    for name, stack in zip(self.stack_names, self.stacks()):
      x, stack_aux, caches[name] = stack.prefill(x, ctx, options, lengths, slots)
      aux += flatten_aux(stack_aux)
    logits, hidden = self._final(x)
    return ModelOutput(logits, hidden, _routing(aux)), DecodeCache(caches)

  def decode(self, input_ids: jax.Array, positions: jax.Array, cache: DecodeCache,
             attn_impl: str = "absorb", moe_impl: str | None = None, scan: bool | None = None,
             *, options: RunOptions | None = None
             ) -> tuple[jax.Array, jax.Array, DecodeCache]:
    """T new tokens input_ids int[B,T] at positions int[B,T] (consecutive per row), attending
    over cache slots below each row's first position and over each other. Returns (logits
    [B,T,V], final hidden [B,T,D], the cache with the new tokens written at their positions).
    MLA: attn_impl "absorb" attends in the latent space, "naive" expands keys/values. NSA
    (attn_impl unused): the three branches over each layer's decode state."""
    options = options or run_options(moe_impl, attn_impl, scan)
    ctx = self._decode_context(TokenContext(input_ids, positions), cache.slots)
    x = self.residual.expand(self.embed_tokens(input_ids))
    caches = {}
    for name, stack in zip(self.stack_names, self.stacks()):
      x, caches[name] = stack.decode(x, ctx, cache.layers[name], options)
    logits, hidden = self._final(x)
    return logits, hidden, cache._replace(layers=caches)

  def mtp_prefill(self, next_ids: jax.Array, hidden: jax.Array, positions: jax.Array,
                  moe_impl: str | None = None):
    """The first MTP module over aligned inputs: input t pairs hidden[:, t] (the main model's
    final hidden state of the token before next_ids[:, t]) with next_ids[:, t] at
    positions[:, t]. Returns (the module's normalised hidden [B,T,D], whose logits
    (`logits_from_hidden`) predict the token after next_ids, and its cache [1,B,T,...] with
    slot t for input t)."""
    module = self._first_mtp()
    ctx = self._context(TokenContext(next_ids, positions))
    out, cache = module.prefill(self.embed_tokens(next_ids), hidden, ctx, run_options(moe_impl))
    return out, jax.tree.map(lambda a: a[None], cache)

  def mtp_decode(self, next_ids: jax.Array, hidden: jax.Array, positions: jax.Array, cache,
                 attn_impl: str = "absorb", moe_impl: str | None = None):
    """mtp_prefill for new inputs at positions int[B,T] over the module's cache [1,B,S,...];
    returns (logits [B,T,V], the cache with the new inputs written at their positions)."""
    module = self._first_mtp()
    layer_cache = jax.tree.map(lambda a: a[0], cache)
    # The module's first input sits at position 1 (it pairs hidden state 0 with token 1), so
    # slot 0 is never written.
    ctx = self._decode_context(TokenContext(next_ids, positions), layer_cache.slots,
                               first_slot=1)
    out, update = module.decode(self.embed_tokens(next_ids), hidden, ctx, layer_cache,
                                run_options(moe_impl, attn_impl))
    return self.logits_from_hidden(out), cache.write(jax.tree.map(lambda a: a[None], update),
                                                     positions)

  def _first_mtp(self) -> MTPModule:
    kind = self.config.mtp_spec.attention
    if not attention_kind(kind).drafts_with_mtp:
      raise ValueError(f"MTP drafting decodes the MTP module with MLA's latent cache; this "
                       f"model has attention={kind!r}. Turn speculative decoding off.")
    if not len(self.mtp):
      raise ValueError("This model has num_mtp_layers=0: MTP drafting needs an MTP module; "
                       "use a checkpoint with MTP weights or turn speculative decoding off.")
    return self.mtp[0]

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.forward(input_ids, positions, segment_ids).logits

  def mtp_forward(self, input_ids: jax.Array, hidden: jax.Array,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  moe_impl: str | None = None, *, options: RunOptions | None = None
                  ) -> list["MTPOutput"]:
    """An MTPOutput (logits [B,T-k,V], routing of the module's MoE layer [1,B*(T-k),...],
    its attention losses) for each MTP depth k = 1..num_mtp_layers. Position i of depth k
    predicts token i+k+1: it pairs hidden state i with token i+k. `hidden` is the main
    model's final hidden [B,T,D]; with `segment_ids` (packed sequences) attention stays
    inside each sequence. `options` replaces moe_impl when given."""
    if not len(self.mtp):
      raise ValueError("This model has num_mtp_layers=0; set num_mtp_layers >= 1 for MTP.")
    positions = self.default_positions(input_ids) if positions is None else positions
    outputs = []
    for k, module in enumerate(self.mtp, start=1):
      seg = None if segment_ids is None else segment_ids[:, k:]
      ctx = self._context(TokenContext(input_ids[:, k:], positions[:, k:], seg))
      hidden, aux = module(self.embed_tokens(input_ids[:, k:]), hidden[:, :-1], ctx,
                           options or run_options(moe_impl))
      routing = None if aux.routing is None else jax.tree.map(lambda a: a[None], aux.routing)
      outputs.append(MTPOutput(self.logits_from_hidden(hidden), routing,
                               _attention_losses([aux])))
    return outputs

  def mtp_logits(self, input_ids: jax.Array, hidden: jax.Array | None = None,
                 positions: jax.Array | None = None, moe_impl: str | None = None
                 ) -> list[jax.Array]:
    """Logits of each MTP depth k = 1..num_mtp_layers: a list of [B,T-k,V] arrays whose
    position i predicts token i+k+1 (depth k pairs hidden state i with token i+k).
    `hidden` is the main model's final hidden [B,T,D] (computed if not given)."""
    if hidden is None:
      hidden = self.forward(input_ids, positions, moe_impl=moe_impl).hidden
    return [out.logits for out in self.mtp_forward(input_ids, hidden, positions,
                                                    moe_impl=moe_impl)]

  def _check_input(self, input_ids) -> None:
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int[B,T]; got shape {input_ids.shape}.")
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}; shorten the input.")
