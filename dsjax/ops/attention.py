"""Softmax attention: the dense reference, masks, and the training / prefill dispatcher over
its implementations (dimension legend in dsjax.model; docs/attention.md).

One math: key s is visible to query t iff k_positions[s] <= q_positions[t] and, with segment
ids (sequence packing), q_segment_ids[t] == k_segment_ids[s] != 0; softmax(q.k * scale) v
with float32 logits; a query with no visible key gives 0. `AttentionMask` describes that
visibility in O(T + S) values; `.dense()` is the bool [B,1,T,S] the reference reads.
"""

from typing import NamedTuple

import jax

from dsjax.ops.platform import target_platform
import jax.numpy as jnp

from dsjax.config import ATTENTION_IMPLS
# "auto" on CPU: the dense path while T*S stays below this (the tiny test models; its [B,N,T,S]
# float32 logits are 4 MiB per batch row and head at the threshold), blocked above.
DENSE_MAX_LOGITS = 1 << 20


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


class AttentionMask(NamedTuple):
  """Which keys each query sees, without the [B,1,T,S] array: q_positions int[B,T],
  k_positions int[B,S], and for packed sequences q_segment_ids int[B,T], k_segment_ids
  int[B,S] (0 = padding) or None."""
  q_positions: jax.Array
  k_positions: jax.Array
  q_segment_ids: jax.Array | None = None
  k_segment_ids: jax.Array | None = None

  @classmethod
  def self_attention(cls, positions: jax.Array, segment_ids: jax.Array | None = None
                     ) -> "AttentionMask":
    """Tokens attending to themselves: queries and keys share positions and segment ids."""
    return cls(positions, positions, segment_ids, segment_ids)

  def dense(self) -> jax.Array:
    """bool[B,1,T,S], as attention_mask gives."""
    return attention_mask(*self)


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
  probs = attention_probs(q, k, mask, scale).astype(v.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """dot_product_attention's weights: float32 [B,N,T,S], softmax(q.k * scale) over the keys
  of `mask` (broadcastable to [B,N,T,S]), 0 elsewhere and in rows without a key."""
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> str:
  """'auto' -> on TPU 'pallas' where the kernel can be placed (a context mesh set by
  jax.set_mesh, or a one-device TPU process: dsjax.ops.flash_attention.kernel_placeable),
  else 'blocked'; on GPU 'cudnn' where cuDNN's fused attention takes these operands
  (flash_attention.cudnn_supported), else 'blocked'; on CPU 'dense' while
  T*S < DENSE_MAX_LOGITS, else 'blocked'. Other names are returned unchanged."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r}; use one of {ATTENTION_IMPLS}.")
  if impl != "auto":
    return impl
  platform = target_platform()
  if platform in ("tpu", "gpu"):
    from dsjax.ops import flash_attention
    if platform == "tpu":
      return "pallas" if flash_attention.kernel_placeable() else "blocked"
    return "cudnn" if flash_attention.cudnn_supported(q, k, v) else "blocked"
  return "dense" if q.shape[1] * k.shape[1] < DENSE_MAX_LOGITS else "blocked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
              impl: str = "auto") -> jax.Array:
  """softmax(q.k * scale) v over the keys `mask` shows each query, by implementation `impl`
  (ATTENTION_IMPLS; docs/attention.md): q [B,T,N,Hq], k [B,S,N,Hq], v [B,S,N,Hv] ->
  [B,T,N,Hv] in v's dtype. All implementations compute the same function (tested equal)."""
  impl = resolve_impl(impl, q, k, v)
  if impl == "dense":
    return dot_product_attention(q, k, v, mask.dense(), scale)
  from dsjax.ops import flash_attention  # the kernels load only when used
  if impl == "blocked":
    return flash_attention.blocked_attention(q, k, v, mask, scale)
  if impl == "cudnn":
    return flash_attention.cudnn_attention(q, k, v, mask, scale)
  return flash_attention.pallas_attention(q, k, v, mask, scale,
                                          interpret=target_platform() == "cpu")
