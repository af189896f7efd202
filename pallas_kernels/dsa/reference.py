"""DeepSeek-V3.2's token-sparse MLA (DSA) in plain XLA: the semantics the kernels are tested
against. It is FlashMLA's sparse prefill: MQA over one shared latent per token (MLA in its
absorbed form).

  q [B,T,N,D] (D = C + R: the absorbed no-rope part and the rope part), latent [B,S,D] (the
  normalised c_kv next to the rotated k_pe), indices int [B,T,K] into the S axis of the same
  batch row. An index outside [0, S) (-1 by convention) selects nothing.
  logits[b,t,n,j] = scale * q[b,t,n] . latent[b, indices[b,t,j]]       (valid j only)
  p = softmax over the valid j, in float32
  out[b,t,n] = sum_j p[b,t,n,j] * latent[b, indices[b,t,j], :C]       (values: the first C
                                                                         = v_dim channels)
  A query with no valid index gives 0, log-sum-exp -inf, and finite (zero) gradients.

Duplicate indices in a row: the gather oracle and the kernels count a repeated index twice
(twice the weight, and its gradient twice); the dense-mask oracle counts it once. Callers
(dsjax.ops.dsa.top_k) give distinct indices, where the two agree.

`sparse_mla_reference` is the dense-mask oracle, O(T*S) ([B,T,S] mask); `sparse_mla_gather`
gathers each query's K rows, O(T*K*D), and is what plain JAX autodiff differentiates.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.nsa.reference import masked_softmax

_HIGHEST = jax.lax.Precision.HIGHEST


def valid_indices(indices: jax.Array, num_keys: int) -> jax.Array:
  """bool, indices' shape: the entries that name a key (0 <= index < S)."""
  return (indices >= 0) & (indices < num_keys)


def selection_mask(indices: jax.Array, num_keys: int) -> jax.Array:
  """indices int [B,T,K] -> bool [B,T,S]: key s is selected by query t."""
  keys = jnp.arange(num_keys, dtype=indices.dtype)
  return jnp.any(indices[..., :, None] == keys, axis=-2)


def sparse_mla_reference(q, latent, indices, scale: float, v_dim: int,
                         return_lse: bool = False):
  """The dense-mask oracle: q [B,T,N,D], latent [B,S,D], indices int [B,T,K] -> out
  [B,T,N,C] in q's dtype (and lse f32 [B,T,N] with return_lse). float32, HIGHEST precision."""
  f32 = jnp.float32
  latent = latent.astype(f32)
  logits = jnp.einsum("BTND,BSD->BTNS", q.astype(f32), latent, precision=_HIGHEST) * scale
  mask = selection_mask(indices, latent.shape[1])[:, :, None, :]
  p, lse = masked_softmax(logits, mask)
  out = jnp.einsum("BTNS,BSC->BTNC", p, latent[..., :v_dim], precision=_HIGHEST)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def gather_rows(latent: jax.Array, indices: jax.Array):
  """latent [B,S,D], indices int [B,T,K] -> (rows [B,T,K,D], valid bool [B,T,K]). Invalid
  indices are clipped into range (and marked invalid), so the gather never reads out of
  bounds."""
  valid = valid_indices(indices, latent.shape[1])
  safe = jnp.clip(indices, 0, latent.shape[1] - 1)
  return jax.vmap(lambda rows, idx: rows[idx])(latent, safe), valid


def sparse_mla_gather(q, latent, indices, scale: float, v_dim: int, return_lse: bool = False):
  """The gather oracle: same result as the dense one (duplicates apart), memory O(T*K*D).
  float32, HIGHEST precision."""
  f32 = jnp.float32
  rows, valid = gather_rows(latent.astype(f32), indices)
  logits = jnp.einsum("BTND,BTKD->BTNK", q.astype(f32), rows, precision=_HIGHEST) * scale
  p, lse = masked_softmax(logits, valid[:, :, None, :])
  out = jnp.einsum("BTNK,BTKC->BTNC", p, rows[..., :v_dim], precision=_HIGHEST)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out
