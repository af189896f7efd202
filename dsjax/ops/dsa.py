"""DeepSeek Sparse Attention's lightning indexer math (DeepSeek-V3.2), pure jnp.

  I[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]) * index_head_dim^-0.5,  w = weights_proj(x) * H^-0.5

over the keys query t may see; each query keeps its top-k keys, and MLA attends to those only.
Also here: the gather path in query chunks, the blocked scoring and sort-free top-k that never
hold [T,S] scores, the indexer's KL loss (DeepSeek-V3.2's two training stages) and the
FP8-faithful mode's Hadamard rotation and e4m3 quantiser with power-of-two (ue8m0) scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

E4M3_MAX = 448.0


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


def _selected_logits(q_nope, q_pe, c_sel, pe_sel, w_uk, scale) -> jax.Array:
  """float32 [B,T,N,k]: absorbed MLA logits of each query against its selected latents."""
  f32 = jnp.float32
  q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
  return (jnp.einsum("BTNC,BTKC->BTNK", q_latent, c_sel, preferred_element_type=f32)
          + jnp.einsum("BTNR,BTKR->BTNK", q_pe, pe_sel, preferred_element_type=f32)) * scale


def selected_probs(q_nope, q_pe, c_kv, k_pe, indices, valid, wkv_b, scale):
  """(float32 [B,T,N,k] attention probabilities over each query's selected latents (0 where
  not valid; rows without a valid key are all 0), the selected latents [B,T,k,C]). Operands
  as sparse_latent_attention."""
  w_uk = wkv_b[..., :q_nope.shape[-1]]
  c_sel, pe_sel = _take_rows(c_kv, indices), _take_rows(k_pe, indices)  # [B,T,k,C], [B,T,k,R]
  logits = _selected_logits(q_nope, q_pe, c_sel, pe_sel, w_uk, scale)
  mask = valid[:, :, None, :]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0), c_sel


QUERY_BLOCK = 32  # queries per chunk of the gather path: [block, k, C+R] gathered at a time


def in_query_chunks(fn, block: int, *per_query):
  """fn(*per_query) computed over chunks of `block` queries (axis 1 of every operand) with
  lax.map, each chunk rematerialised in the backward, so that only one chunk's intermediates
  are live; outputs (a pytree, query axis 1) joined. Short inputs go in one piece; a ragged
  last chunk is zero-padded (False for masks) and cut off again."""
  t = per_query[0].shape[1]
  if t <= block:
    return fn(*per_query)
  n = -(-t // block)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)

  def join(y):
    return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], n * block, *y.shape[3:])[:, :t]

  outs = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(map(split, per_query)))
  return jax.tree.map(join, outs)


def sparse_latent_attention(q_nope, q_pe, c_kv, k_pe, indices, valid, wkv_b, scale,
                            query_block: int = QUERY_BLOCK, with_target: bool = False):
  """MLA in its absorbed (MQA) form over each query's selected latents only: q_nope
  [B,T,N,Hn], q_pe [B,T,N,R] (rotated), c_kv [B,S,C], k_pe [B,S,R], indices/valid [B,T,k]
  (dsa.top_k), wkv_b [C,N,Hn+Hv] -> [B,T,N,Hv]. Never [T,S]: queries go in chunks of
  `query_block`, each gathering its [block, k] latents (in_query_chunks). A query with no
  valid key returns zeros. with_target: also the head-mean attention probabilities over the
  selected keys, float32 [B,T,k] without gradient (the sparse stage's indexer target)."""
  def chunk(qn, qp, idx, ok):
    probs, c_sel = selected_probs(qn, qp, c_kv, k_pe, idx, ok, wkv_b, scale)
    out = values_from_probs(probs, c_sel, wkv_b, qn.shape[-1])
    return (out, head_mean(probs)) if with_target else out

  return in_query_chunks(chunk, query_block, q_nope, q_pe, indices, valid)


def selected_target(q_nope, q_pe, c_kv, k_pe, indices, valid, wkv_b, scale,
                    query_block: int = QUERY_BLOCK) -> jax.Array:
  """sparse_latent_attention's target alone (the head-mean attention probabilities over each
  query's selected keys, float32 [B,T,k], no gradient), for an attention computed elsewhere
  (the Pallas kernels)."""
  def chunk(qn, qp, idx, ok):
    return head_mean(selected_probs(qn, qp, c_kv, k_pe, idx, ok, wkv_b, scale)[0])
  return in_query_chunks(chunk, query_block, q_nope, q_pe, indices, valid)


def kernel_attention(q_nope, q_pe, c_kv, k_pe, indices, valid, wkv_b, scale, platform: str):
  """sparse_latent_attention on pallas_kernels.dsa.sparse_mla (TPU / GPU kernels; their
  interpreter when `platform` is "cpu"): the absorbed query [q_nope.W_uk | q_pe] against the
  latent [c_kv | k_pe], then the output's W_uv expansion."""
  from pallas_kernels import dsa as dsa_kernels  # the kernels load only when used
  nope = q_nope.shape[-1]
  latent = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)
  q = jnp.concatenate([jnp.einsum("BTNH,CNH->BTNC", q_nope, wkv_b[..., :nope]),
                       q_pe], axis=-1).astype(latent.dtype)
  out = dsa_kernels.sparse_mla(q, latent, jnp.where(valid, indices, -1), float(scale),
                               c_kv.shape[-1], interpret=platform == "cpu",
                               backend=None if platform == "cpu" else platform)
  return jnp.einsum("BTNC,CNH->BTNH", out, wkv_b[..., nope:].astype(out.dtype))


def values_from_probs(probs, c_sel, wkv_b, nope_dim: int) -> jax.Array:
  """Absorbed MLA's output [B,T,N,Hv] from probabilities [B,T,N,k] over the selected latents
  c_sel [B,T,k,C]: their weighted sum, expanded by wkv_b's value part [C,N,Hv]."""
  out_latent = jnp.einsum("BTNK,BTKC->BTNC", probs.astype(c_sel.dtype), c_sel)
  return jnp.einsum("BTNC,CNH->BTNH", out_latent, wkv_b[..., nope_dim:])


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


def scores_at(q: jax.Array, k: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
  """index_scores at each query's selected keys only: q [B,T,H,D], k [B,S,D], weights [B,T,H],
  indices int[B,T,k] -> float32 [B,T,k] (O(T*k), never [T,S])."""
  k_sel = _take_rows(k, indices).astype(jnp.float32)  # [B,T,k,D]
  logits = jnp.einsum("BTHD,BTKD->BTHK", q.astype(jnp.float32), k_sel)
  logits = jax.nn.relu(logits * q.shape[-1] ** -0.5)
  return jnp.einsum("BTHK,BTH->BTK", logits, weights.astype(jnp.float32))


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 in the same order (-inf lowest): the sign bit flipped for positive
  numbers, every bit for negative ones."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def threshold_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The same key sets as top_k's (ties to the lower index) without sorting: the k-th
  largest score found bit by bit (32 counting passes over [..., S]), then every key above it
  and the lowest-index ones equal to it, in index order. scores float [..., S] (-inf: not
  visible) -> (indices int32 [..., k], valid bool [..., k]: the score is finite)."""
  bits = _ordered_bits(scores)
  threshold = jnp.zeros(scores.shape[:-1] + (1,), jnp.uint32)
  for bit in range(31, -1, -1):
    candidate = threshold | jnp.uint32(1 << bit)
    enough = jnp.sum(bits >= candidate, axis=-1, keepdims=True, dtype=jnp.int32) >= k
    threshold = jnp.where(enough, candidate, threshold)
  above = bits > threshold
  ties = bits == threshold
  room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  take = above | (ties & (jnp.cumsum(ties, axis=-1, dtype=jnp.int32) <= room))
  # the j-th taken key: the first position whose running count of taken keys reaches j + 1
  counts = jnp.cumsum(take, axis=-1, dtype=jnp.int32)
  wanted = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32), scores.shape[:-1] + (k,))
  flat = lambda x: x.reshape(-1, x.shape[-1])
  indices = jax.vmap(lambda c, w: jnp.searchsorted(c, w, side="left"))(flat(counts),
                                                                     flat(wanted))
  indices = indices.reshape(wanted.shape).astype(jnp.int32)
  valid = jnp.take_along_axis(scores, indices, axis=-1) > -jnp.inf
  return indices, valid


def blocked_top_k(q: jax.Array, k: jax.Array, weights: jax.Array, visible_block, top: int,
                  q_block: int = 128, k_block: int = 2048) -> tuple[jax.Array, jax.Array]:
  """dsa.top_k(index_scores(q, k, weights), visible, top) without the [T,S] scores: queries
  in blocks of `q_block`, each scored against the keys in blocks of `k_block` ([q_block, S]
  scores and [q_block, H, k_block] logits live at a time), then each query's top-k set by
  threshold_top_k (the dense top_k's sets, ties to the lower key index, in index order).
  visible_block(q_start, k_start) -> bool [B,q_block,k_block] (mask_block): which keys of the
  key block the block's queries see; rows and keys past T and S come padded and are
  invisible. Returns (indices int32[B,T,k'], valid
  bool[B,T,k']) with k' = min(top, S)."""
  b, t = q.shape[:2]
  s = k.shape[1]
  top = min(top, s)
  nq, nk = -(-t // q_block), -(-s // k_block)
  qp = jnp.pad(q, ((0, 0), (0, nq * q_block - t), (0, 0), (0, 0)))
  wp = jnp.pad(weights, ((0, 0), (0, nq * q_block - t), (0, 0)))
  kp = jnp.pad(k, ((0, 0), (0, nk * k_block - s), (0, 0)))

  def query_block(i):
    qb = jax.lax.dynamic_slice_in_dim(qp, i * q_block, q_block, 1)
    wb = jax.lax.dynamic_slice_in_dim(wp, i * q_block, q_block, 1)

    def key_block(j):
      kb = jax.lax.dynamic_slice_in_dim(kp, j * k_block, k_block, 1)
      return jnp.where(visible_block(i * q_block, j * k_block), index_scores(qb, kb, wb),
                       -jnp.inf)

    scores = jax.lax.map(key_block, jnp.arange(nk))  # [nk,B,q_block,k_block]
    scores = jnp.moveaxis(scores, 0, 2).reshape(b, q_block, nk * k_block)[:, :, :s]
    return threshold_top_k(scores, top)

  indices, valid = jax.lax.map(query_block, jnp.arange(nq))  # [nq,B,q_block,k']
  join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, nq * q_block, top)[:, :t]
  return join(indices), join(valid)


def mask_block(mask, q_block: int, k_block: int):
  """visible_block for blocked_top_k from an AttentionMask (dsjax.ops.attention): key s is
  visible to query t iff its position is not later and, with segment ids, the segments match
  (padding keys, segment 0, never); rows and keys past the ends are invisible."""
  def pad(x, block, fill):
    n = -(-x.shape[1] // block) * block
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=fill)

  big = jnp.iinfo(jnp.int32).max
  qpos = pad(mask.q_positions.astype(jnp.int32), q_block, -1)
  kpos = pad(mask.k_positions.astype(jnp.int32), k_block, big)
  segments = mask.q_segment_ids is not None
  qseg = pad(mask.q_segment_ids, q_block, -1) if segments else None
  kseg = pad(mask.k_segment_ids, k_block, 0) if segments else None

  def visible(q_start, k_start):
    qs = lambda x: jax.lax.dynamic_slice_in_dim(x, q_start, q_block, 1)[:, :, None]
    ks = lambda x: jax.lax.dynamic_slice_in_dim(x, k_start, k_block, 1)[:, None, :]
    vis = ks(kpos) <= qs(qpos)
    if segments:
      vis &= (qs(qseg) == ks(kseg)) & (ks(kseg) != 0)
    return vis
  return visible


# ---- the indexer's training loss (DeepSeek-V3.2, Sec. 2.1) ----

def head_mean(probs: jax.Array, head_axis: int = 2) -> jax.Array:
  """The main attention's distribution as the indexer's target: probabilities ([B,T,N,K] by
  default) summed over the heads and L1-normalised (each head's row sums to 1 or is all 0, so
  this is their mean) -> float32 [B,T,K], without gradient."""
  return jax.lax.stop_gradient(jnp.mean(probs.astype(jnp.float32), axis=head_axis))


def indexer_kl(target: jax.Array, scores: jax.Array, valid: jax.Array) -> jax.Array:
  """KL(target || softmax(scores)) per query over its `valid` keys: target float [B,T,K] (0
  off `valid`, summing to 1 over it), scores float [B,T,K] (the indexer's I), valid bool
  [B,T,K] -> float32 [B,T]; 0 for a query without valid keys."""
  log_q = jax.nn.log_softmax(jnp.where(valid, scores.astype(jnp.float32), -jnp.inf), axis=-1)
  p = jnp.where(valid, target, 0.0)
  terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
  return jnp.sum(terms, axis=-1)


# ---- the FP8-faithful indexer (DeepSeek's deployed kernels) ----

@functools.cache
def _hadamard_matrix(n: int) -> np.ndarray:
  """Sylvester's n x n Hadamard matrix (n a power of two), entries +-1, natural order."""
  if n & (n - 1):
    raise ValueError(f"The FP8 indexer's Hadamard rotation needs a power-of-two head dim, not "
                     f"{n}; set dsa.index_head_dim to one (DeepSeek-V3.2: 128) or "
                     "dsa.index_precision='exact'.")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def hadamard(x: jax.Array) -> jax.Array:
  """x [..., D] times the orthonormal Hadamard matrix D^-0.5 H_D (float32 arithmetic, x's
  dtype out): fast_hadamard_transform(x, scale=D^-0.5), as DeepSeek's rotate_activation."""
  d = x.shape[-1]
  h = jnp.asarray(_hadamard_matrix(d) * d ** -0.5)
  y = jnp.einsum("...D,DE->...E", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def quantize_e4m3(x: jax.Array, block: int = 128, power_of_two: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """DeepSeek's act_quant: x [..., D] in blocks of `block` channels -> (float8_e4m3fn
  [..., D], float32 scales [..., D/block]); scale = max(amax, 1e-4) / 448, rounded up to a
  power of two (ue8m0) when power_of_two; values = clip(x / scale, -448, 448) rounded to
  nearest-even e4m3."""
  *lead, d = x.shape
  if d % block:
    raise ValueError(f"FP8 quantisation in blocks of {block} needs the last dim ({d}) to be a "
                     "multiple of it.")
  xb = x.astype(jnp.float32).reshape(*lead, d // block, block)
  amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), 1e-4)
  scale = amax * jnp.float32(1.0 / E4M3_MAX)
  if power_of_two:  # 2^ceil(log2 scale), from the float's exponent bits (log2 is inexact)
    mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [.5, 1)
    scale = jnp.ldexp(jnp.float32(1.0), exponent - (mantissa == 0.5).astype(exponent.dtype))
  q = jnp.clip(xb / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return q.reshape(*lead, d), scale


def fp8_round_trip(x: jax.Array, block: int = 128) -> jax.Array:
  """x after the e4m3 / ue8m0 quantiser and back (float32): what DeepSeek's FP8 index kernel
  multiplies; the forward is exact quantise-dequantise, the gradient passes straight through."""
  *lead, d = x.shape
  q, scale = quantize_e4m3(x, min(block, d))
  deq = (q.astype(jnp.float32).reshape(*lead, scale.shape[-1], -1) * scale[..., None])
  x32 = x.astype(jnp.float32)
  return x32 + jax.lax.stop_gradient(deq.reshape(x.shape) - x32)
