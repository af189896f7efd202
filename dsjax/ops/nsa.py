"""Native Sparse Attention math (Yuan et al. 2025), pure jnp, GQA layout.

q [B,T,N,H] with N = G*KV query heads; keys/values [B,T,KV,H] / [B,T,KV,Hv]. Query head n uses
kv head n // G. Three branches, all causal:
  * compression: attention over compressed blocks (length l, stride d) that lie wholly in the
    past of the query;
  * selection: attention over the tokens of the top-n selection blocks (length l'), scored by
    the compression attention probabilities (Eq. 9 read spatially, summed over each GQA group
    as in Eq. 10), the first block and the 2 local blocks always chosen;
  * sliding window: attention over the last w tokens.
A query with no visible key in a branch gets 0 from it (as fla-core's references).
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def num_compressed_blocks(t: int, length: int, stride: int) -> int:
  """Compressed blocks [i*d, i*d + l) that fit in t tokens."""
  return max(0, (t - length) // stride + 1)


def block_windows(x: jax.Array, length: int, stride: int) -> jax.Array:
  """x [B,T,KV,H] -> [B,C,KV,length,H]: the tokens of each compressed block."""
  c = num_compressed_blocks(x.shape[1], length, stride)
  index = np.arange(c)[:, None] * stride + np.arange(length)[None, :]
  return x[:, index].swapaxes(2, 3)


def grouped_attention(q, k, v, allowed, scale: float) -> tuple[jax.Array, jax.Array]:
  """Masked softmax attention with GQA. q [...,T,N,H], k [...,S,KV,H], v [...,S,KV,Hv],
  allowed bool broadcastable to [...,T,S] -> (o [...,T,N,Hv], probs [...,T,N,S]). float32;
  rows with no allowed key give zeros."""
  *lead, t, n, h = q.shape
  kv = k.shape[-2]
  qg = q.reshape(*lead, t, kv, n // kv, h).astype(jnp.float32)
  logits = jnp.einsum("...TKGH,...SKH->...KGTS", qg, k.astype(jnp.float32),
                      precision=_HIGHEST) * scale
  mask = allowed[..., None, None, :, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  o = jnp.einsum("...KGTS,...SKH->...TKGH", probs, v.astype(jnp.float32), precision=_HIGHEST)
  probs = jnp.moveaxis(probs.reshape(*lead, n, t, -1), -3, -2)
  return o.reshape(*lead, t, n, v.shape[-1]), probs


def compression_visible(t: int, c: int, length: int, stride: int,
                        query_offset: int = 0) -> np.ndarray:
  """bool [T,C]: compressed block i is visible to the query at position query_offset + t when
  its last token i*d + l - 1 <= that position."""
  positions = query_offset + np.arange(t)[:, None]
  return (np.arange(c)[None, :] * stride + length - 1) <= positions


def compression_attention(q, k_cmp, v_cmp, length: int, stride: int, scale: float,
                          query_offset: int = 0):
  """q [B,T,N,H] (positions query_offset..), compressed keys/values [B,C,KV,*] ->
  (o [B,T,N,Hv], probs [B,T,N,C])."""
  allowed = compression_visible(q.shape[1], k_cmp.shape[1], length, stride, query_offset)
  return grouped_attention(q, k_cmp, v_cmp, jnp.asarray(allowed), scale)


def overlap_matrix(c: int, length: int, stride: int, block: int, num_blocks: int) -> np.ndarray:
  """float [C, num_blocks]: 1 where compressed block i ([i*d, i*d+l)) overlaps selection block
  j ([j*l', (j+1)*l')); Eq. 9 read spatially (each overlapping block counted once)."""
  starts = np.arange(c)[:, None] * stride
  j = np.arange(num_blocks)[None, :]
  return ((starts < (j + 1) * block) & (starts + length > j * block)).astype(np.float32)


def selection_scores(probs, kv_heads: int, length: int, stride: int, block: int,
                     num_blocks: int | None = None) -> jax.Array:
  """Compression probabilities [B,T,N,C] -> selection-block importance [B,T,KV,num_blocks]
  (default ceil(T/l')), summed over the query heads of each GQA group (Eq. 10)."""
  b, t, n, c = probs.shape
  num_blocks = -(-t // block) if num_blocks is None else num_blocks
  overlap = jnp.asarray(overlap_matrix(c, length, stride, block, num_blocks))
  grouped = probs.reshape(b, t, kv_heads, n // kv_heads, c).sum(axis=3)
  return jnp.einsum("BTKC,CS->BTKS", grouped, overlap, precision=_HIGHEST)


def select_blocks(scores, top_n: int, block: int, num_initial: int = 1,
                  num_local: int = 2, query_offset: int = 0) -> jax.Array:
  """Importance [B,T,KV,S_all] of the queries at positions query_offset.. -> int32 block
  indices [B,T,KV,top_n], -1 where fewer blocks exist. Only blocks j <= t // l' are
  candidates; the first `num_initial` blocks and the `num_local` blocks ending at the query's
  own block are always chosen."""
  t, num_blocks = scores.shape[1], scores.shape[-1]
  own = ((query_offset + np.arange(t)) // block)[:, None, None]
  j = np.arange(num_blocks)[None, None, :]
  causal = j <= own
  forced = causal & ((j < num_initial) | (j > own - num_local))
  ranked = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
  k = min(top_n, num_blocks)
  top, index = jax.lax.top_k(ranked, k)
  index = jnp.where(top > -jnp.inf, index, -1).astype(jnp.int32)
  if k < top_n:
    index = jnp.pad(index, [(0, 0)] * 3 + [(0, top_n - k)], constant_values=-1)
  return index


def sliding_window_attention(q, k, v, window: int, scale: float) -> jax.Array:
  """Each query t attends to keys t - w < s <= t. Queries are cut into chunks of w, and a
  chunk reads only its own and the previous chunk's keys: O(T*2w), not O(T^2)."""
  b, t, n, h = q.shape
  w = min(window, t)
  chunks = -(-t // w)
  pad = chunks * w - t

  def chunked(x):
    x = jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
    return x.reshape(b, chunks, w, *x.shape[2:])
  qc, kc, vc = chunked(q), chunked(k), chunked(v)
  # Keys of chunk i: chunk i-1 then chunk i (a zero chunk before the first, masked off).
  previous = lambda x: jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * 3)[:, :-1]
  keys = jnp.concatenate([previous(kc), kc], axis=2)
  values = jnp.concatenate([previous(vc), vc], axis=2)
  query_pos = np.arange(chunks)[:, None] * w + np.arange(w)[None, :]
  key_pos = query_pos[:, None, :1] - w + np.arange(2 * w)[None, None, :]
  distance = query_pos[:, :, None] - key_pos
  allowed = (distance >= 0) & (distance < window) & (key_pos >= 0)
  o, _ = grouped_attention(qc, keys, values, jnp.asarray(allowed)[None], scale)
  return o.reshape(b, chunks * w, n, -1)[:, :t]


def window_attention(q, k, v, query_offset: int, key_offset: int, window: int, scale: float):
  """Sliding-window attention of the queries at positions query_offset.. over the keys at
  positions key_offset.. (a slice holding every key their windows reach), by a dense mask."""
  query_pos = query_offset + np.arange(q.shape[1])[:, None]
  distance = query_pos - (key_offset + np.arange(k.shape[1])[None, :])
  allowed = jnp.asarray((distance >= 0) & (distance < window))
  return grouped_attention(q, k, v, allowed, scale)[0]


def _chunk_branches(qc, keys, values, k_cmp, v_cmp, *, offset: int, whole: bool, nsa,
                    scale: float, select):
  """branch_outputs for the queries at positions offset .. offset+len(qc)-1."""
  length, stride, block = nsa.compress_block, nsa.compress_stride, nsa.select_block
  end = offset + qc.shape[1]
  visible = min(num_compressed_blocks(end, length, stride), k_cmp.shape[1])
  if visible:
    o_cmp, probs = compression_attention(qc, k_cmp[:, :visible], v_cmp[:, :visible], length,
                                         stride, scale, offset)
  else:  # no compressed block is complete yet
    o_cmp = jnp.zeros(qc.shape[:3] + (v_cmp.shape[-1],), jnp.float32)
    probs = jnp.zeros(qc.shape[:3] + (0,), jnp.float32)
  scores = selection_scores(jax.lax.stop_gradient(probs), nsa.num_kv_heads, length, stride,
                            block, num_blocks=-(-end // block))
  indices = select_blocks(scores, nsa.num_selected, block, query_offset=offset)
  o_slc = select(qc, keys[0][:, :end], values[0][:, :end], indices, offset)
  if whole:
    o_win = sliding_window_attention(qc, keys[1], values[1], nsa.window, scale)
  else:
    start = max(0, offset - nsa.window + 1)
    o_win = window_attention(qc, keys[1][:, start:end], values[1][:, start:end], offset,
                             start, nsa.window, scale)
  return jnp.stack([o.astype(jnp.float32) for o in (o_cmp, o_slc, o_win)]), indices


def branch_outputs(q, keys, values, k_cmp, v_cmp, nsa, scale: float, select,
                   query_chunk: int | None = None):
  """The three NSA branches for queries q [B,T,N,H].

  keys / values: the selection and window branches' [2,B,T,KV,*]; k_cmp / v_cmp: the
  compressed keys/values [B,C,KV,*]; nsa: an NSAConfig; select(q, k, v, indices, offset):
  selected attention of the queries at positions offset.. . With `query_chunk`, queries are
  processed in chunks of that many, each reading only the keys it can see and recomputed in
  the backward pass (jax.checkpoint), so memory stays bounded for long sequences.
  -> (outputs [3,B,T,N,Hv] float32, block indices int32[B,T,KV,n]).
  """
  t = q.shape[1]
  if not query_chunk or query_chunk >= t:
    return _chunk_branches(q, keys, values, k_cmp, v_cmp, offset=0, whole=True, nsa=nsa,
                           scale=scale, select=select)
  outs, all_indices = [], []
  for offset in range(0, t, query_chunk):
    chunk = jax.checkpoint(functools.partial(_chunk_branches, offset=offset, whole=False,
                                             nsa=nsa, scale=scale, select=select))
    o, indices = chunk(q[:, offset:offset + query_chunk], keys, values, k_cmp, v_cmp)
    outs.append(o)
    all_indices.append(indices)
  return jnp.concatenate(outs, axis=2), jnp.concatenate(all_indices, axis=1)
