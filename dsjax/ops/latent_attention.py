"""MLA attention over latent keys/values (the decode path), two implementations of one math.

Keys and values live in the cache as the normalised latent c_kv [B,S,C] plus one rotated rope
key k_pe [B,S,R] shared by all heads; wkv_b [C,N,Hn+Hv] holds the per-head up-projections
(key part W_uk [C,N,Hn], value part W_uv [C,N,Hv]).

  "naive":  expand k_nope = c_kv W_uk and v = c_kv W_uv per head, then softmax attention.
  "absorb": fold W_uk into the query (q_lat = q_nope W_uk^T, [B,T,N,C]), attend over c_kv
            directly, and fold W_uv into the output (o = (p c_kv) W_uv): DeepSeek's reference
            `attn_impl="absorb"`. Per query it reads C+R values per key instead of
            N*(Hn+R+Hv), which is what makes decoding memory-cheap.

wkv_b may also come output-major (dsjax.ops.linear.OutMajor, [N,Hn+Hv,C]: the decoding layout
on CPU), which gives each head's W_uk and W_uv as contiguous [H,C] blocks; input-major, XLA
transposes both per call.

Keys come as several segments (e.g. the cache and the tokens of this step), each with its own
mask; the softmax is joint over all of them, so the cache is never concatenated or copied.
"""

import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dsjax.ops.linear import OutMajor

ATTN_IMPLS = ("absorb", "naive")


class KeySegment(NamedTuple):
  """c_kv [B,S,C], k_pe [B,S,R] and mask bool [B,1,T,S] (or [B,N,T,S])."""
  c_kv: jax.Array
  k_pe: jax.Array
  mask: jax.Array


def _up_projections(wkv_b: jax.Array | OutMajor, nope_dim: int):
  """(W_uk, W_uv, their einsum axes): [C,N,Hn], [C,N,Hv], "CNH" from wkv_b [C,N,Hn+Hv], or
  [N,Hn,C], [N,Hv,C], "NHC" from an OutMajor one."""
  if isinstance(wkv_b, OutMajor):
    return *jnp.split(wkv_b.t, [nope_dim], axis=1), "NHC"
  return *jnp.split(wkv_b, [nope_dim], axis=-1), "CNH"


def _logits(q_nope, q_pe, segment: KeySegment, w_uk, w_axes: str, absorb: bool) -> jax.Array:
  """[B,T,N,S]. Absorbed, the products take the cache as their left operand, keys as rows
  ([S,C] . [C,T*N] per batch row), and the small result is transposed after: with the cache
  as the right operand, contracted along its rows, XLA:CPU's products took 0.5 instead of 0.35
  ms per layer and benchmarks/decode.py's decode step 8% longer (docs/benchmarks.md)."""
  f32 = jnp.float32
  if absorb:
    q_latent = jnp.einsum(f"BTNH,{w_axes}->BTNC", q_nope, w_uk)
    nope = jnp.einsum("BSC,BTNC->BSTN", segment.c_kv, q_latent, preferred_element_type=f32)
    rope = jnp.einsum("BSR,BTNR->BSTN", segment.k_pe, q_pe, preferred_element_type=f32)
    return jnp.transpose(nope + rope, (0, 2, 3, 1))
  rope = jnp.einsum("BTNR,BSR->BTNS", q_pe, segment.k_pe, preferred_element_type=f32)
  k_nope = jnp.einsum(f"BSC,{w_axes}->BSNH", segment.c_kv, w_uk)
  nope = jnp.einsum("BTNH,BSNH->BTNS", q_nope, k_nope, preferred_element_type=f32)
  return nope + rope


def _values(probs, segment: KeySegment, w_uv, w_axes: str, absorb: bool) -> jax.Array:
  probs = probs.astype(segment.c_kv.dtype)
  if absorb:
    out_latent = jnp.einsum("BTNS,BSC->BTNC", probs, segment.c_kv)
    return jnp.einsum(f"BTNC,{w_axes}->BTNH", out_latent, w_uv)
  v = jnp.einsum(f"BSC,{w_axes}->BSNH", segment.c_kv, w_uv)
  return jnp.einsum("BTNS,BSNH->BTNH", probs, v)


def latent_attention(q_nope: jax.Array, q_pe: jax.Array, segments: Sequence[KeySegment],
                     wkv_b: jax.Array | OutMajor, scale: float, impl: str = "absorb"
                     ) -> jax.Array:
  """softmax((q_nope.k_nope + q_pe.k_pe) * scale) v over all key segments.

  q_nope [B,T,N,Hn], q_pe [B,T,N,R] (rotated), wkv_b [C,N,Hn+Hv] -> [B,T,N,Hv]. A query with no
  visible key returns zeros.
  """
  if impl not in ATTN_IMPLS:
    raise ValueError(f"attn_impl={impl!r}; use one of {ATTN_IMPLS}.")
  absorb = impl == "absorb"
  w_uk, w_uv, w_axes = _up_projections(wkv_b, q_nope.shape[-1])
  logits = [_logits(q_nope, q_pe, s, w_uk, w_axes, absorb) * scale for s in segments]
  masks = [jnp.broadcast_to(jnp.swapaxes(s.mask, 1, 2), l.shape)
           for s, l in zip(segments, logits)]
  logits = jnp.concatenate(logits, axis=-1)
  mask = jnp.concatenate(masks, axis=-1)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
  parts = jnp.split(probs, list(itertools.accumulate(s.c_kv.shape[1] for s in segments))[:-1],
                    axis=-1)
  return sum(_values(p, s, w_uv, w_axes, absorb) for p, s in zip(parts, segments))
