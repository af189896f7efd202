"""DeepSeek Sparse Attention's lightning indexer math (DeepSeek-V3.2), pure jnp.

  I[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]) * index_head_dim^-0.5,  w = weights_proj(x) * H^-0.5

over the keys query t may see; each query keeps its top-k keys, and MLA attends to those only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def index_scores(q: jax.Array, k: jax.Array, weights: jax.Array) -> jax.Array:
  """q [B,T,H,D], k [B,S,D], weights [B,T,H] (already scaled by H^-0.5) -> float32 [B,T,S]."""
  logits = jnp.einsum("BTHD,BSD->BTHS", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = jax.nn.relu(logits * q.shape[-1] ** -0.5)
  return jnp.einsum("BTHS,BTH->BTS", logits, weights.astype(jnp.float32))


def top_k_mask(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
  """bool [B,T,S]: each query's k highest-scoring visible keys (all visible keys when fewer
  than k are visible). `visible` bool [B,T,S]."""
  k = min(k, scores.shape[-1])
  masked = jnp.where(visible, scores, -jnp.inf)
  _, indices = jax.lax.top_k(masked, k)
  b, t = scores.shape[:2]
  selected = jnp.zeros(scores.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], indices].set(True)
  return selected & visible
