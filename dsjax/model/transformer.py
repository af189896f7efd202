"""dsjax.Transformer: embedding -> dense stack -> MoE stack -> norm -> head (+ MTP modules)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.mtp import MTPModule
from dsjax.model.norm import RMSNorm
from dsjax.model.param import normal_param
from dsjax.model.stack import LatentCache, LayerStack, cache_slots, write_slots
from dsjax.ops.attention import AttentionMask, decode_masks
from dsjax.ops.latent_attention import KeySegment
from dsjax.ops.nsa import document_starts
from dsjax.ops.nsa_decode import NSACache
from dsjax.ops.rope import rope_cos_sin
from dsjax.ops.routing import Routing
from dsjax.ops.linear import project
from dsjax.parallel.activations import LOGITS, TOKENS, constrain


class ModelOutput(NamedTuple):
  """logits [B,T,V]; hidden [B,T,D] (final, normalised); routing of the MoE layers stacked as
  [L_moe, B*T, ...] (None without MoE layers)."""
  logits: jax.Array
  hidden: jax.Array
  routing: Routing | None


class DecodeCache(NamedTuple):
  """Decode caches of the dense stack, the MoE stack and the first MTP module (None where the
  model has none): LatentCaches for MLA (slot s holding the token at position s), NSACaches
  (dsjax.ops.nsa_decode) for NSA."""
  dense: LatentCache | NSACache | None
  moe: LatentCache | NSACache | None
  mtp: LatentCache | None


class Transformer(nnx.Module):
  """A DeepSeek-V2/V3-family decoder. `model(input_ids int32[B,T]) -> logits float[B,T,V]`."""

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"head": (0, 1)}

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, std, pdt = cfg.hidden_size, cfg.initializer_range, cfg.param_dtype
    self.config = cfg
    self.embed = normal_param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), std, pdt)
    self.dense_layers = nnx.data(LayerStack(cfg, False, cfg.num_dense_layers, rngs=rngs)
                                 if cfg.num_dense_layers else None)
    self.moe_layers = nnx.data(LayerStack(cfg, True, cfg.num_moe_layers, rngs=rngs)
                               if cfg.num_moe_layers else None)
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

  def _rope_and_mask(self, positions, segment_ids):
    """cos, sin and what keeps attention inside a packed sequence: MLA's AttentionMask
    (positions and segment ids; no [B,1,T,T] array); NSA's document starts int[B,T] (None
    without segment_ids), its branches being causal by construction."""
    cos, sin = rope_cos_sin(positions, self.config.rope, self.config.rope_dim)
    if self.config.attention == "nsa":
      return cos, sin, None if segment_ids is None else document_starts(segment_ids)
    return cos, sin, AttentionMask.self_attention(positions, segment_ids)

  @staticmethod
  def default_positions(input_ids: jax.Array) -> jax.Array:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  # ---- forward passes ----
  def forward(self, input_ids: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None, moe_impl: str | None = None,
              scan: bool | None = None) -> ModelOutput:
    """Full forward pass with hidden states and routing. positions int[B,T] default to
    0..T-1; segment_ids int[B,T] (0 = padding) restrict attention to one packed sequence."""
    self._check_input(input_ids)
    positions = self.default_positions(input_ids) if positions is None else positions
    cos, sin, mask = self._rope_and_mask(positions, segment_ids)
    x = self.embed_tokens(input_ids)
    routing = None
    if self.dense_layers is not None:
      x, _ = self.dense_layers(x, cos, sin, mask, moe_impl, scan)
    if self.moe_layers is not None:
      x, routing = self.moe_layers(x, cos, sin, mask, moe_impl, scan)
    hidden = self.norm(x)
    return ModelOutput(self.logits_from_hidden(hidden), hidden, routing)

  def prefill(self, input_ids: jax.Array, positions: jax.Array | None = None,
              moe_impl: str | None = None, scan: bool | None = None,
              lengths: jax.Array | None = None, slots: int | None = None
              ) -> tuple[ModelOutput, DecodeCache]:
    """forward() that also returns the decode cache of these T tokens for the dense and MoE
    stacks (mtp None), with `slots` slots (default T; slot t = token t). lengths int[B]: each
    row's prompt length (default T; the tokens after it are padding). MLA caches are the
    tokens' latents (they do not depend on `lengths`); NSA caches are the layers' decode
    state, whose rings hold each row's last positions before its length."""
    self._check_input(input_ids)
    if slots is not None and slots < input_ids.shape[1]:
      raise ValueError(f"slots={slots} cannot hold the {input_ids.shape[1]} prompt tokens; "
                       f"use slots >= {input_ids.shape[1]}.")
    positions = self.default_positions(input_ids) if positions is None else positions
    cos, sin, mask = self._rope_and_mask(positions, None)
    x = self.embed_tokens(input_ids)
    routing = dense = moe = None
    if self.dense_layers is not None:
      x, _, dense = self.dense_layers.prefill(x, cos, sin, mask, moe_impl, scan, lengths, slots)
    if self.moe_layers is not None:
      x, routing, moe = self.moe_layers.prefill(x, cos, sin, mask, moe_impl, scan, lengths,
                                                slots)
    hidden = self.norm(x)
    return (ModelOutput(self.logits_from_hidden(hidden), hidden, routing),
            DecodeCache(dense, moe, None))

  def decode(self, input_ids: jax.Array, positions: jax.Array, cache: DecodeCache,
             attn_impl: str = "absorb", moe_impl: str | None = None, scan: bool | None = None
             ) -> tuple[jax.Array, jax.Array, DecodeCache]:
    """T new tokens input_ids int[B,T] at positions int[B,T] (consecutive per row), attending
    over cache slots below each row's first position and over each other. Returns (logits
    [B,T,V], final hidden [B,T,D], the cache with the new tokens written at their positions).
    MLA: attn_impl "absorb" attends in the latent space, "naive" expands keys/values. NSA
    (attn_impl unused): the three branches over each layer's decode state."""
    cos, sin = rope_cos_sin(positions, self.config.rope, self.config.rope_dim)
    if self.config.attention == "nsa":
      cache_mask = new_mask = None
    else:
      slots = cache_slots(cache.dense or cache.moe)
      cache_mask, new_mask = decode_masks(positions, slots)
    x = self.embed_tokens(input_ids)
    stacks = {}
    for name, stack in (("dense", self.dense_layers), ("moe", self.moe_layers)):
      if stack is not None:
        x, stacks[name] = stack.decode(x, cos, sin, getattr(cache, name), positions, cache_mask,
                                       new_mask, attn_impl, moe_impl, scan)
    hidden = self.norm(x)
    return self.logits_from_hidden(hidden), hidden, cache._replace(**stacks)

  def mtp_prefill(self, next_ids: jax.Array, hidden: jax.Array, positions: jax.Array,
                  moe_impl: str | None = None) -> tuple[jax.Array, LatentCache]:
    """The first MTP module over aligned inputs: input t pairs hidden[:, t] (the main model's
    final hidden state of the token before next_ids[:, t]) with next_ids[:, t] at
    positions[:, t]. Returns (the module's normalised hidden [B,T,D], whose logits
    (`logits_from_hidden`) predict the token after next_ids, and its latent cache [1,B,T,...]
    with slot t for input t)."""
    module = self._first_mtp()
    cos, sin, mask = self._rope_and_mask(positions, None)
    out, (c_kv, k_pe) = module.prefill(self.embed_tokens(next_ids), hidden, cos, sin, mask,
                                       moe_impl)
    return out, LatentCache(c_kv[None], k_pe[None])

  def mtp_decode(self, next_ids: jax.Array, hidden: jax.Array, positions: jax.Array,
                 cache: LatentCache, attn_impl: str = "absorb", moe_impl: str | None = None
                 ) -> tuple[jax.Array, LatentCache]:
    """mtp_prefill for new inputs at positions int[B,T] over the module's cache [1,B,S,...];
    returns (logits [B,T,V], the cache with the new inputs written at their positions)."""
    module = self._first_mtp()
    cos, sin = rope_cos_sin(positions, self.config.rope, self.config.rope_dim)
    # The module's first input sits at position 1 (it pairs hidden state 0 with token 1), so
    # slot 0 is never written.
    cache_mask, new_mask = decode_masks(positions, cache.c_kv.shape[2], first_slot=1)
    segment = KeySegment(cache.c_kv[0], cache.k_pe[0], cache_mask)
    out, (c_kv, k_pe) = module.decode(self.embed_tokens(next_ids), hidden, cos, sin, segment,
                                      new_mask, attn_impl, moe_impl)
    return self.logits_from_hidden(out), write_slots(
        cache, LatentCache(c_kv[None], k_pe[None]), positions)

  def _first_mtp(self) -> MTPModule:
    if self.config.attention != "mla":
      raise ValueError(f"MTP drafting decodes the MTP module with MLA's latent cache; this "
                       f"model has attention={self.config.attention!r}. Turn speculative "
                       "decoding off.")
    if not len(self.mtp):
      raise ValueError("This model has num_mtp_layers=0: MTP drafting needs an MTP module; "
                       "use a checkpoint with MTP weights or turn speculative decoding off.")
    return self.mtp[0]

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.forward(input_ids, positions, segment_ids).logits

  def mtp_forward(self, input_ids: jax.Array, hidden: jax.Array,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  moe_impl: str | None = None) -> list[tuple[jax.Array, Routing | None]]:
    """(logits [B,T-k,V], routing of the module's MoE layer [1,B*(T-k),...]) for each MTP depth
    k = 1..num_mtp_layers. Position i of depth k predicts token i+k+1: it pairs hidden state i
    with token i+k. `hidden` is the main model's final hidden [B,T,D]; with `segment_ids`
    (packed sequences) attention stays inside each sequence."""
    if not len(self.mtp):
      raise ValueError("This model has num_mtp_layers=0; set num_mtp_layers >= 1 for MTP.")
    positions = self.default_positions(input_ids) if positions is None else positions
    outputs = []
    for k, module in enumerate(self.mtp, start=1):
      seg = None if segment_ids is None else segment_ids[:, k:]
      cos, sin, mask = self._rope_and_mask(positions[:, k:], seg)
      hidden, routing = module(self.embed_tokens(input_ids[:, k:]), hidden[:, :-1], cos, sin,
                               mask, moe_impl)
      routing = None if routing is None else jax.tree.map(lambda a: a[None], routing)
      outputs.append((self.logits_from_hidden(hidden), routing))
    return outputs

  def mtp_logits(self, input_ids: jax.Array, hidden: jax.Array | None = None,
                 positions: jax.Array | None = None, moe_impl: str | None = None
                 ) -> list[jax.Array]:
    """Logits of each MTP depth k = 1..num_mtp_layers: a list of [B,T-k,V] arrays whose
    position i predicts token i+k+1 (depth k pairs hidden state i with token i+k).
    `hidden` is the main model's final hidden [B,T,D] (computed if not given)."""
    if hidden is None:
      hidden = self.forward(input_ids, positions, moe_impl=moe_impl).hidden
    return [logits for logits, _ in self.mtp_forward(input_ids, hidden, positions,
                                                      moe_impl=moe_impl)]

  def _check_input(self, input_ids) -> None:
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int[B,T]; got shape {input_ids.shape}.")
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}; shorten the input.")
