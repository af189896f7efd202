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


def top_k(scores: jax.Array, visible: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(indices int32[B,T,k'], valid bool[B,T,k']) of each query's k' = min(k, S) highest-scoring
  visible keys; `valid` is False where fewer than k' keys are visible (those indices point at
  invisible keys)."""
  masked = jnp.where(visible, scores, -jnp.inf)
  values, indices = jax.lax.top_k(masked, min(k, scores.shape[-1]))
  return indices.astype(jnp.int32), values > -jnp.inf


def _take_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x [B,S,F], indices [B,T,k] -> [B,T,k,F]."""
  return jax.vmap(lambda rows, idx: rows[idx])(x, indices)


def sparse_latent_attention(q_nope, q_pe, c_kv, k_pe, indices, valid, wkv_b, scale):
  """MLA in its absorbed (MQA) form over each query's selected latents only: q_nope
  [B,T,N,Hn], q_pe [B,T,N,R] (rotated), c_kv [B,S,C], k_pe [B,S,R], indices/valid [B,T,k]
  (dsa.top_k), wkv_b [C,N,Hn+Hv] -> [B,T,N,Hv]. Reads k latents per query: O(T*k) memory,
  never [T,S]. A query with no valid key returns zeros."""
  w_uk, w_uv = jnp.split(wkv_b, [q_nope.shape[-1]], axis=-1)
  f32 = jnp.float32
  c_sel, pe_sel = _take_rows(c_kv, indices), _take_rows(k_pe, indices)  # [B,T,k,C], [B,T,k,R]
  q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
  logits = (jnp.einsum("BTNC,BTKC->BTNK", q_latent, c_sel, preferred_element_type=f32)
            + jnp.einsum("BTNR,BTKR->BTNK", q_pe, pe_sel, preferred_element_type=f32)) * scale
  mask = valid[:, :, None, :]
  logits = jnp.where(mask, logits, jnp.finfo(f32).min)
  probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0).astype(c_kv.dtype)
  out_latent = jnp.einsum("BTNK,BTKC->BTNC", probs, c_sel)
  return jnp.einsum("BTNC,CNH->BTNH", out_latent, w_uv)


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
