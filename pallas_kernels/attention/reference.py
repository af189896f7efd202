"""The dense oracle of flash attention (the same math as dsjax.ops.attention's reference).

Key s is visible to query t iff k_positions[s] <= q_positions[t] and, with segment ids,
q_segment_ids[t] == k_segment_ids[s] != 0. Logits and softmax in float32; a query with no
visible key gives 0.
"""

import jax
import jax.numpy as jnp


def visible_keys(q_positions, k_positions, q_segment_ids=None, k_segment_ids=None):
  """bool [B,T,S]: which keys each query sees."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segment_ids is not None:
    mask &= ((q_segment_ids[:, :, None] == k_segment_ids[:, None, :])
             & (k_segment_ids[:, None, :] != 0))
  return mask


def attention_reference(q, k, v, q_positions, k_positions, q_segment_ids=None,
                        k_segment_ids=None, *, scale: float, return_lse: bool = False):
  """q [B,T,N,Hq], k [B,S,N,Hq], v [B,S,N,Hv] -> o [B,T,N,Hv] in v's dtype (and the log-sum-exp
  f32 [B,N,T], -inf where a query sees no key, with return_lse)."""
  mask = visible_keys(q_positions, k_positions, q_segment_ids, k_segment_ids)[:, None]
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.)[..., None]),
                    0.)
  o = jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)
  return (o, lse) if return_lse else o
