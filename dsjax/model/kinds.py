"""Attention and feed-forward kinds: the interfaces a layer's parts implement, and the
registries that map a LayerSpec's names to them.

A decoder layer (dsjax.model.block.Block) is an attention kind and a feed-forward kind joined
by the residual stream; nothing outside a kind's own module knows which kind it is. To add a
kind, subclass the interface, implement its methods and register it by name:

  @register_attention("mha")
  class MultiHeadAttention(AttentionKind): ...

then name it in ModelConfig.layer_pattern (LayerSpec(attention="mha", ffn="dense")).

Attention kinds own three things besides their parameters:
  - a per-sequence context (`context`, `decode_context`): rope tables with the kind's own
    dims, masks, document starts: built once per forward pass for every layer of the kind;
  - a decode cache type (one layer's, [B,...]; a stack of layers adds a leading axis), with
    `slots` (int), `write(update, positions)` (the stacked decode path's single write after
    the last layer) and `padded(slots, offset)`;
  - the four passes: forward, prefill (forward + the cache), decode (reads the cache, returns
    the new tokens' update) and decode_in_place (writes the new tokens into the cache first).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

ATTENTION_KINDS: dict[str, type["AttentionKind"]] = {}
FFN_KINDS: dict[str, type["FeedForwardKind"]] = {}


class TokenContext(NamedTuple):
  """What every layer may read about the tokens: ids int[B,T] (None in MTP modules, whose
  inputs mix two tokens), positions int[B,T], segment ids int[B,T] of packed rows (None: one
  sequence per row)."""
  ids: jax.Array | None
  positions: jax.Array
  segment_ids: jax.Array | None = None


class AttentionKind(nnx.Module):
  """The interface of an attention kind; x [B,T,D] -> out [B,T,D]."""

  # False where the kind cannot serve the MTP draft module's latent-slot decoding.
  drafts_with_mtp = False

  @classmethod
  def create(cls, cfg, *, rngs: nnx.Rngs) -> "AttentionKind":
    raise NotImplementedError

  @classmethod
  def context(cls, cfg, tokens: TokenContext) -> Any:
    """Per-sequence context for forward / prefill (rope tables, masks, document starts)."""
    raise NotImplementedError

  @classmethod
  def decode_context(cls, cfg, positions: jax.Array, slots: int, first_slot: int = 0) -> Any:
    """Per-step context of T new tokens at positions int[B,T] over a cache of `slots` slots,
    of which slots before `first_slot` are never written."""
    raise NotImplementedError

  @classmethod
  def flops_per_token(cls, cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the attention scores and values (not the projections)."""
    raise NotImplementedError

  def attend(self, x, ctx, options) -> jax.Array:
    raise NotImplementedError

  def attend_with_loss(self, x, ctx, options) -> tuple[jax.Array, dict | None]:
    """(attend's output, the kind's training losses {name: float32 scalar} or None). Kinds
    with a loss of their own (DSA's indexer) override this; the model sums each name over
    its layers (ModelOutput.attention_losses)."""
    return self.attend(x, ctx, options), None

  def attend_prefill(self, x, ctx, options, lengths=None, slots: int | None = None):
    """(out, the layer's decode cache with `slots` slots (default T); lengths int[B]: each
    row's prompt length, default T)."""
    raise NotImplementedError

  def attend_decode(self, x, ctx, cache, positions, options):
    """(out, update): reads `cache` only; the update goes through cache.write(update,
    positions) once all layers ran."""
    raise NotImplementedError

  def attend_decode_in_place(self, x, ctx, cache, positions, options):
    """(out, the cache after the step, the new tokens written before attention reads it)."""
    raise NotImplementedError


class FeedForwardKind(nnx.Module):
  """The interface of a feed-forward kind: x [B,T,D] -> (y [B,T,D], auxiliary output or
  None: routing for routed MoE layers, gathered by the model for balancing)."""

  # True where feed_forward's auxiliary output is a Routing: such layers take rows of the
  # model's stacked routing (dsjax.model.pattern.routed_rows).
  routed = False

  @classmethod
  def create(cls, cfg, *, rngs: nnx.Rngs) -> "FeedForwardKind":
    raise NotImplementedError

  def feed_forward(self, x, tokens: TokenContext, options):
    raise NotImplementedError


def _register(table: dict, what: str, name: str):
  def register(cls):
    if name in table and table[name] is not cls:
      raise ValueError(f"{what} kind {name!r} is already registered ({table[name].__name__}).")
    table[name] = cls
    return cls
  return register


def register_attention(name: str):
  """Class decorator: registers an AttentionKind under `name`."""
  return _register(ATTENTION_KINDS, "attention", name)


def register_ffn(name: str):
  """Class decorator: registers a FeedForwardKind under `name`."""
  return _register(FFN_KINDS, "feed-forward", name)


def _lookup(table: dict, what: str, name: str):
  _load_builtin_kinds()
  if name not in table:
    raise ValueError(f"Unknown {what} kind {name!r} in the layer pattern; registered: "
                     f"{', '.join(sorted(table))} (register new kinds with "
                     f"dsjax.model.kinds.register_{'attention' if what == 'attention' else 'ffn'}).")
  return table[name]


def attention_kind(name: str) -> type[AttentionKind]:
  return _lookup(ATTENTION_KINDS, "attention", name)


def ffn_kind(name: str) -> type[FeedForwardKind]:
  return _lookup(FFN_KINDS, "feed-forward", name)


def attention_kinds() -> dict[str, type[AttentionKind]]:
  """Every registered attention kind by name (the built-in ones included)."""
  _load_builtin_kinds()
  return dict(ATTENTION_KINDS)


def ffn_kinds() -> dict[str, type[FeedForwardKind]]:
  """Every registered feed-forward kind by name (the built-in ones included)."""
  _load_builtin_kinds()
  return dict(FFN_KINDS)


def _load_builtin_kinds() -> None:
  """The built-in kinds register when their modules are imported."""
  from dsjax.model import dsa, hash_moe, mla, mlp, moe, nsa, v4_attention  # noqa: F401
