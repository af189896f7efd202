"""Softmax attention reference and mask construction (dimension legend in dsjax.model)."""

import jax
import jax.numpy as jnp


def attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                   q_segment_ids: jax.Array | None = None,
                   k_segment_ids: jax.Array | None = None) -> jax.Array:
  """bool[B,1,T,S]: key s is visible to query t if it is not in the future and, with segment
  ids (sequence packing; 0 marks padding keys), belongs to the same segment."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    mask = mask & same & (k_segment_ids[:, None, :] != 0)
  return mask[:, None, :, :]


def decode_masks(positions: jax.Array, cache_len: int, first_slot: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
  """Masks for T new tokens at consecutive positions int[B,T] of each row, over a cache whose
  slot s holds position s: (cache slots from `first_slot` up to below the row's first new
  position, bool[B,1,T,S]; the new tokens among themselves, causal, bool[B,1,T,T]). Slots at
  or after the first new position are stale (a rejected draft, prompt padding) and stay
  hidden."""
  slots = jnp.arange(cache_len, dtype=positions.dtype)[None, None, None, :]
  cache_mask = (slots >= first_slot) & (slots < positions[:, None, :1, None])
  return cache_mask, attention_mask(positions, positions)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float) -> jax.Array:
  """softmax(q.k * scale) v with float32 logits.

  q [B,T,N,H], k [B,S,N,H], v [B,S,N,Hv], mask bool broadcastable to [B,N,T,S] -> [B,T,N,Hv].
  A query row with no visible key returns zeros rather than NaN.
  """
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)
