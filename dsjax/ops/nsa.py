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

Packed rows: `starts` int[B,T] (see `document_starts`), where given, is the row index at which
each query's document begins. No branch then reads a key before it: compressed blocks must lie
wholly inside the document, selection candidates begin at the document's first block (which
takes the place of block 0 as the always-chosen initial block) and tokens of a selected block
before the start are masked, and the window stops at the start.
"""

import functools
import math

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


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """segment_ids int[B,T] of packed documents (each a contiguous run; 0 = padding) ->
  int32[B,T]: the row index where each token's document begins, and -1 for padding, which
  keeps no document boundary (its outputs carry no loss and no later token reads them)."""
  t = segment_ids.shape[-1]
  index = jnp.arange(t, dtype=jnp.int32)
  boundary = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  starts = jax.lax.cummax(jnp.where(boundary, index, 0), axis=segment_ids.ndim - 1)
  return jnp.where(segment_ids == 0, -1, starts)


def query_positions(t: int, query_offset=0) -> jax.Array:
  """int32 [T]: the positions query_offset .. query_offset+T-1 (the offset may be traced)."""
  return query_offset + jnp.arange(t, dtype=jnp.int32)


def compression_visible(positions, c: int, length: int, stride: int, starts=None
                        ) -> jax.Array:
  """Queries at positions int[...,T] -> bool [...,T,C]: compressed block i is visible to a
  query when its last token i*d + l - 1 is at or before the query's position (and, with
  document starts int[...,T], its first token i*d at or after the query's start)."""
  first = jnp.arange(c, dtype=jnp.int32) * stride
  visible = first + length - 1 <= jnp.asarray(positions)[..., None]
  return visible if starts is None else visible & (first >= starts[..., None])


def compression_attention(q, k_cmp, v_cmp, length: int, stride: int, scale: float,
                          positions=None, starts=None):
  """q [B,T,N,H] at positions int[T] or [B,T] (default 0..T-1), compressed keys/values
  [B,C,KV,*] -> (o [B,T,N,Hv], probs [B,T,N,C]). starts: document starts int[B,T]."""
  positions = query_positions(q.shape[1]) if positions is None else positions
  allowed = compression_visible(positions, k_cmp.shape[1], length, stride, starts)
  return grouped_attention(q, k_cmp, v_cmp, allowed, scale)


def keys_per_query(t: int, nsa) -> np.ndarray:
  """float [T]: the keys NSA attends for the query at each position 0..T-1: its visible
  compressed blocks, the tokens of its n selected blocks and its window (each capped by the
  causal prefix). Full causal attention attends position + 1."""
  pos = np.arange(t)
  compressed = np.maximum(0, (pos + 1 - nsa.compress_block) // nsa.compress_stride + 1)
  selected = np.minimum(pos + 1, nsa.num_selected * nsa.select_block)
  window = np.minimum(pos + 1, nsa.window)
  return (compressed + selected + window).astype(np.float64)


def overlap_matrix(c: int, length: int, stride: int, block: int, num_blocks: int) -> np.ndarray:
  """float [C, num_blocks]: 1 where compressed block i ([i*d, i*d+l)) overlaps selection block
  j ([j*l', (j+1)*l')); Eq. 9 read spatially (each overlapping block counted once)."""
  starts = np.arange(c)[:, None] * stride
  j = np.arange(num_blocks)[None, :]
  return ((starts < (j + 1) * block) & (starts + length > j * block)).astype(np.float32)


def overlap_band(c: int, length: int, stride: int, block: int, num_blocks: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The overlap matrix as a band: (rows int[num_blocks, W], valid bool[num_blocks, W]) with
  the compressed blocks overlapping each selection block (they are consecutive), W the most
  any selection block overlaps."""
  overlap = overlap_matrix(c, length, stride, block, num_blocks).astype(bool)
  counts = overlap.sum(axis=0)
  first = np.where(counts > 0, overlap.argmax(axis=0), 0)
  width = max(int(counts.max(initial=0)), 1)
  offsets = np.arange(width)[None, :]
  valid = offsets < counts[:, None]
  return np.where(valid, first[:, None] + offsets, 0), valid


def selection_scores(probs, kv_heads: int, length: int, stride: int, block: int,
                     num_blocks: int | None = None) -> jax.Array:
  """Compression probabilities [B,T,N,C] -> selection-block importance [B,T,KV,num_blocks]
  (default ceil(T/l')), summed over the query heads of each GQA group (Eq. 10): for each
  selection block, the sum of the probabilities of the compressed blocks that overlap it
  (`overlap_matrix`, read as a band: O(num_blocks * W) per query, not O(C * num_blocks))."""
  b, t, n, c = probs.shape
  num_blocks = -(-t // block) if num_blocks is None else num_blocks
  if c == 0:
    return jnp.zeros((b, t, kv_heads, num_blocks), probs.dtype)
  rows, valid = overlap_band(c, length, stride, block, num_blocks)
  grouped = probs.reshape(b, t, kv_heads, n // kv_heads, c).sum(axis=3)
  return jnp.where(valid, grouped[..., rows], 0.0).sum(axis=-1)


def select_blocks(scores, top_n: int, block: int, num_initial: int = 1,
                  num_local: int = 2, positions=None, starts=None) -> jax.Array:
  """Importance [B,T,KV,S_all] of the queries at positions int[T] or [B,T] (default 0..T-1;
  may be traced) -> int32 block indices [B,T,KV,top_n], -1 where fewer blocks exist. Only
  blocks j <= position // l' are candidates; the first `num_initial` blocks and the
  `num_local` blocks ending at the query's own block are always chosen. With document starts
  int[B,T], candidates begin at the block holding the start, the first of the document."""
  t, num_blocks = scores.shape[1], scores.shape[-1]
  positions = query_positions(t) if positions is None else jnp.asarray(positions)
  own = (positions // block)[..., None, None]
  first = 0 if starts is None else (starts // block)[..., None, None]
  j = jnp.arange(num_blocks, dtype=jnp.int32)
  causal = (j <= own) & (j >= first)
  forced = causal & ((j < first + num_initial) | (j > own - num_local))
  ranked = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
  k = min(top_n, num_blocks)
  top, index = jax.lax.top_k(ranked, k)
  index = jnp.where(top > -jnp.inf, index, -1).astype(jnp.int32)
  if k < top_n:
    index = jnp.pad(index, [(0, 0)] * 3 + [(0, top_n - k)], constant_values=-1)
  return index


def window_blocks(q, k_ext, v_ext, first_position, window: int, block: int, scale: float,
                  starts=None):
  """Sliding-window attention in blocks: q [B,n*block,N,H] at positions first_position..
  (may be traced), k_ext / v_ext [B,(n+m)*block,KV,*] at positions first_position - m*block..
  with m = ceil(window / block) (negative positions are padding). Query block i reads only key
  blocks i..i+m: O(T*(w+block)) work. starts: the queries' document starts int[B,n*block]."""
  b, t = q.shape[:2]
  n, m = t // block, -(-window // block)
  qc = q.reshape(b, n, block, *q.shape[2:])
  blocks = lambda x: x.reshape(b, n + m, block, *x.shape[2:])
  reach = lambda x: jnp.concatenate([blocks(x)[:, s:s + n] for s in range(m + 1)], axis=2)
  query_pos = first_position + jnp.arange(n)[:, None] * block + jnp.arange(block)[None, :]
  key_pos = (first_position - m * block + jnp.arange(n)[:, None] * block
             + jnp.arange((m + 1) * block)[None, :])
  distance = query_pos[:, :, None] - key_pos[:, None, :]
  allowed = ((distance >= 0) & (distance < window) & (key_pos[:, None, :] >= 0))[None]
  if starts is not None:
    allowed = allowed & (key_pos[None, :, None, :] >= starts.reshape(b, n, block)[..., None])
  o, _ = grouped_attention(qc, reach(k_ext), reach(v_ext), allowed, scale)
  return o.reshape(b, t, *o.shape[3:])


def sliding_window_attention(q, k, v, window: int, scale: float, starts=None) -> jax.Array:
  """Each query t attends to keys t - w < s <= t (and s >= its document start, with starts
  int[B,T]), in blocks of w queries that each read their own and the previous block's keys:
  O(T*2w), not O(T^2)."""
  t = q.shape[1]
  block = min(window, t)
  n, m = -(-t // block), -(-window // block)
  pad = lambda x, front: jnp.pad(x, [(0, 0), (front, n * block - t)] + [(0, 0)] * (x.ndim - 2))
  return window_blocks(pad(q, 0), pad(k, m * block), pad(v, m * block), 0, window, block,
                       scale, None if starts is None else pad(starts, 0))[:, :t]


def window_selection(t: int, window: int, block: int, starts=None):
  """Sliding windows written as block selections, for the block-sparse selection kernel:
  query t's keys t - w < s <= t (and s >= its document start) are the tokens at or after
  key_start[t] in the blocks block_indices[t]. -> (block_indices int32[T,S] of the (at most
  S = (w-1)//block + 2) blocks of {max(t-w+1, 0) .. t}, -1 in the unused slots;
  key_start int32[T], or [B,T] given document starts int[B,T])."""
  positions = jnp.arange(t, dtype=jnp.int32)
  key_start = positions - window + 1
  slots = (window - 1) // block + 2
  indices = jnp.maximum(key_start, 0)[:, None] // block + jnp.arange(slots, dtype=jnp.int32)
  indices = jnp.where(indices <= (positions // block)[:, None], indices, -1)
  if starts is not None:
    key_start = jnp.maximum(key_start, starts.astype(jnp.int32))
  return indices, key_start


def window_through_selection(attend_selected, q, k, v, window: int, block: int, starts=None):
  """The sliding-window branch of q [B,T,N,H] over k, v [B,T,KV,*] computed by a block-sparse
  attention attend_selected(q, k, v, block_indices [B,T,KV,S], key_start [B,T], key_end
  [B,T] or None) (e.g. pallas_kernels.nsa.selected_attention) over window_selection's
  blocks."""
  b, t = q.shape[:2]
  indices, key_start = window_selection(t, window, block, starts)
  indices = jnp.broadcast_to(indices[None, :, None], (b, t, k.shape[2], indices.shape[-1]))
  return attend_selected(q, k, v, indices, jnp.broadcast_to(key_start, (b, t)), None)


def compression_through_selection(attend_selected, q, k_cmp, v_cmp, length: int, stride: int,
                                  block: int, starts=None):
  """The compression branch of q [B,T,N,H] over the compressed keys/values [B,C,KV,*]
  computed by a block-sparse attention (see window_through_selection) whose keys are the
  compressed blocks, zero-padded to T, every key block selected: compressed block i is key
  i, and query t's allowed keys are ceil(start/d) .. (t-l+1)//d, the blocks wholly inside
  its document that end at or before it (compression_visible)."""
  b, t = q.shape[:2]
  c, kv = k_cmp.shape[1], k_cmp.shape[2]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, t - c), (0, 0), (0, 0)))
  key_end = jnp.broadcast_to((jnp.arange(t, dtype=jnp.int32) - length + 1) // stride, (b, t))
  key_start = None if starts is None else -(-starts.astype(jnp.int32) // stride)
  slots = -(-c // block)
  indices = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, t, kv, slots))
  return attend_selected(q, pad(k_cmp), pad(v_cmp), indices, key_start, key_end)


def _to_query_chunks(x, query_chunk: int) -> jax.Array:
  """[B,T,...] -> [chunks,B,query_chunk,...], zero-padded to whole chunks."""
  t = x.shape[1]
  chunks = -(-t // query_chunk)
  x = jnp.pad(x, [(0, 0), (0, chunks * query_chunk - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], chunks, query_chunk, *x.shape[2:]), 1, 0)


def _from_query_chunks(x, axis: int, t: int) -> jax.Array:
  """_to_query_chunks' inverse for a chunked result [chunks, ...] whose query axis is `axis`
  within each chunk's [...]: -> [...] with the T queries (padding dropped) on `axis`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return x[(slice(None),) * axis + (slice(0, t),)]


def selection_indices(q, k_cmp, v_cmp, nsa, scale: float, starts=None,
                      query_chunk: int | None = None) -> jax.Array:
  """The selected blocks int32[B,T,KV,n] of the queries q [B,T,N,H] (positions 0..T-1), with
  no gradient: compression probabilities, selection scores, top-n. With `query_chunk`, over
  query chunks (lax.map), so that memory holds one chunk's [chunk, C] probabilities."""
  q, k_cmp, v_cmp = (jax.lax.stop_gradient(x) for x in (q, k_cmp, v_cmp))
  t = q.shape[1]
  if not query_chunk or query_chunk >= t:
    return compression_and_selection(q, k_cmp, v_cmp, query_positions(t), t, nsa, scale,
                                     starts)[1]
  q_chunks = _to_query_chunks(q, query_chunk)

  def chunk(args):
    index, qc, sc = args
    positions = query_positions(query_chunk, index * query_chunk)
    return compression_and_selection(qc, k_cmp, v_cmp, positions, t, nsa, scale, sc)[1]
  xs = (jnp.arange(q_chunks.shape[0], dtype=jnp.int32), q_chunks,
        None if starts is None else _to_query_chunks(starts, query_chunk))
  return _from_query_chunks(jax.lax.map(chunk, xs), 1, t)


def window_attention(q, k, v, q_positions, k_positions, window: int, scale: float):
  """Sliding-window attention by a dense mask: queries at positions int[T] or [B,T] over keys
  at positions int[S] or [B,S] (negative positions are padding); a query sees the keys
  p - w < s <= p."""
  distance = jnp.asarray(q_positions)[..., :, None] - jnp.asarray(k_positions)[..., None, :]
  allowed = (distance >= 0) & (distance < window) & (jnp.asarray(k_positions)[..., None, :] >= 0)
  return grouped_attention(q, k, v, allowed, scale)[0]


def compression_and_selection(q, k_cmp, v_cmp, positions, num_keys: int, nsa, scale: float,
                              starts=None):
  """Compression-branch output [B,T,N,Hv] (float32) and selected block indices int32[B,T,KV,n]
  of the queries q [B,T,N,H] at positions int[T] or [B,T] (document starts int[B,T] or
  None), over compressed keys/values [B,C,KV,*] of a sequence (or a decode cache) of
  `num_keys` tokens."""
  length, stride, block = nsa.compress_block, nsa.compress_stride, nsa.select_block
  if k_cmp.shape[1]:
    o_cmp, probs = compression_attention(q, k_cmp, v_cmp, length, stride, scale, positions,
                                         starts)
  else:  # the sequence is shorter than one compressed block
    o_cmp = jnp.zeros(q.shape[:3] + (v_cmp.shape[-1],), jnp.float32)
    probs = jnp.zeros(q.shape[:3] + (0,), jnp.float32)
  scores = selection_scores(jax.lax.stop_gradient(probs), nsa.num_kv_heads, length, stride,
                            block, num_blocks=-(-num_keys // block))
  return o_cmp, select_blocks(scores, nsa.num_selected, block, positions=positions,
                             starts=starts)


def _stack_branches(*outputs) -> jax.Array:
  return jnp.stack([o.astype(jnp.float32) for o in outputs])


def branch_outputs(q, keys, values, k_cmp, v_cmp, nsa, scale: float, select=None,
                   query_chunk: int | None = None, stages: int = 16, starts=None,
                   attend_selected=None):
  """The three NSA branches for queries q [B,T,N,H].

  keys / values: the selection and window branches' [2,B,T,KV,*]; k_cmp / v_cmp: the
  compressed keys/values [B,C,KV,*]; nsa: an NSAConfig; select(q, k, v, indices, offset,
  starts): selected attention of the queries at positions offset.. (offset may be traced;
  starts their document starts or None) over all keys. starts: document starts int[B,T] of a
  packed row (None: one sequence per row). With `query_chunk`, queries are processed by
  lax.scans over chunks of that many, each chunk recomputed in the backward pass
  (jax.checkpoint), so memory is bounded by one chunk's working set at any sequence length.
  A chunk gathers only its selected blocks and reads only the keys its windows reach; the
  chunks are split into `stages` consecutive scans, each reading only the compressed blocks
  visible by its end.
  attend_selected(q, k, v, block_indices, key_start, key_end) (a block-sparse attention over
  whole sequences, e.g. pallas_kernels.nsa.selected_attention; in place of `select`): all
  three branches through it (compression_through_selection, the selection,
  window_through_selection), after selection_indices, which alone uses `query_chunk`.
  -> (outputs [3,B,T,N,Hv] float32, block indices int32[B,T,KV,n]).
  """
  t = q.shape[1]
  if attend_selected is not None:
    length, stride, block = nsa.compress_block, nsa.compress_stride, nsa.select_block
    indices = selection_indices(q, k_cmp, v_cmp, nsa, scale, starts, query_chunk)
    o_cmp = compression_through_selection(attend_selected, q, k_cmp, v_cmp, length, stride,
                                          block, starts)
    o_slc = attend_selected(q, keys[0], values[0], indices, starts, None)
    o_win = window_through_selection(attend_selected, q, keys[1], values[1], nsa.window, block,
                                     starts)
    return _stack_branches(o_cmp, o_slc, o_win), indices
  if not query_chunk or query_chunk >= t:
    o_cmp, indices = compression_and_selection(q, k_cmp, v_cmp, query_positions(t), t, nsa,
                                                scale, starts)
    o_slc = select(q, keys[0], values[0], indices, 0, starts)
    o_win = sliding_window_attention(q, keys[1], values[1], nsa.window, scale, starts)
    return _stack_branches(o_cmp, o_slc, o_win), indices
  chunks = -(-t // query_chunk)
  padded = chunks * query_chunk
  w, block = nsa.window, math.gcd(query_chunk, nsa.window)
  front = -(-w // block) * block
  # Queries and keys padded to whole chunks: padded keys lie after every real query (never
  # visible to one) and padded queries' outputs are dropped. Window keys are padded in front
  # too, so that chunk [o, o+c) reads the slice [o, o+c+front) = positions o-front .. o+c-1.
  pad = lambda x, first=0: jnp.pad(x, [(0, 0), (first, padded - t)] + [(0, 0)] * (x.ndim - 2))
  q_chunks = _to_query_chunks(q, query_chunk)
  start_chunks = None if starts is None else _to_query_chunks(starts, query_chunk)
  k_slc, v_slc = pad(keys[0]), pad(values[0])
  k_win, v_win = pad(keys[1], front), pad(values[1], front)

  def chunk(k_cmp, v_cmp, index, qc, sc):
    offset = index * query_chunk
    positions = query_positions(query_chunk, offset)
    o_cmp, indices = compression_and_selection(qc, k_cmp, v_cmp, positions, padded, nsa,
                                                scale, sc)
    o_slc = select(qc, k_slc, v_slc, indices, offset, sc)
    reach = lambda x: jax.lax.dynamic_slice_in_dim(x, offset, query_chunk + front, axis=1)
    o_win = window_blocks(qc, reach(k_win), reach(v_win), offset, w, block, scale, sc)
    return _stack_branches(o_cmp, o_slc, o_win), indices

  results = []
  bounds = np.linspace(0, chunks, min(stages, chunks) + 1).round().astype(int)
  for first, last in zip(bounds[:-1], bounds[1:]):
    visible = min(num_compressed_blocks(last * query_chunk, nsa.compress_block,
                                        nsa.compress_stride), k_cmp.shape[1])
    body = jax.checkpoint(functools.partial(chunk, k_cmp[:, :visible], v_cmp[:, :visible]))
    xs = (jnp.arange(first, last, dtype=jnp.int32), q_chunks[first:last],
          None if start_chunks is None else start_chunks[first:last])
    _, out = jax.lax.scan(lambda carry, xs, body=body: (carry, body(*xs)), None, xs)
    results.append(out)
  outs, indices = (jnp.concatenate(parts) for parts in zip(*results))
  return _from_query_chunks(outs, 2, t), _from_query_chunks(indices, 1, t)
