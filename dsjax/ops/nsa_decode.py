"""Native Sparse Attention decoding, pure jnp: the per-layer decode state and the three
branches for T new tokens per row (the training math is dsjax.ops.nsa; the two are tested
equal through the model).

Rows are ragged: each row's new tokens sit at consecutive positions int[B,T] of its own, and a
selection-cache slot s holds the token at position s. Per layer and row the state is
  * the selection branch's keys/values of every slot (the only per-token part);
  * the compressed keys/values of every block that fits in the slots, written when the
    block's last token (position i*d + l - 1) is prefilled or decoded;
  * rings of the compression branch's last l keys/values (what completes the next block) and
    of the window branch's last w (the window), slot p % size for position p.
A step reads the compressed state (the compression branch attends over every compressed
block, masked), n*l' gathered keys per query and KV head (the selected blocks only) and
w + T window keys.
"""

from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from dsjax.ops.nsa import (compression_and_selection, grouped_attention,
                           num_compressed_blocks, window_attention)
from dsjax.ops.slots import write_at_slots
from pallas_kernels.nsa.reference import gather_selected


class NSACache(NamedTuple):
  """The decode state of one NSA layer, [B,...] (a stack of layers adds a leading L axis).

  k_slc [B,S,KV,H], v_slc [B,S,KV,Hv]: the selection branch's rotated keys and values; slot s
    holds position s (slots at or after a row's next position are stale).
  k_cmp [B,C,KV,H], v_cmp [B,C,KV,Hv]: compressed block i (tokens [i*d, i*d+l)) for the
    C = num_compressed_blocks(S) blocks that fit in S slots; entries a row has not completed
    are stale and hidden by the visibility mask.
  k_raw [B,l,KV,H], v_raw [B,l,KV,Hv]: the compression branch's rotated keys and values of
    the row's last l positions, slot p % l.
  k_win [B,w,KV,H], v_win [B,w,KV,Hv]: the window branch's, last w positions, slot p % w.
  A ring entry written for position q replaces q - size, so a step may start at most one
  position before the previous step's end (one rejected token); rewinding further would lose
  ring entries the next queries need.
  """
  k_slc: jax.Array
  v_slc: jax.Array
  k_cmp: jax.Array
  v_cmp: jax.Array
  k_raw: jax.Array
  v_raw: jax.Array
  k_win: jax.Array
  v_win: jax.Array

  @property
  def slots(self) -> int:
    k = self.k_slc
    return k.arrays[0].shape[-3] if hasattr(k, "arrays") else k.shape[-3]

  def write(self, update: "NSACache", positions: jax.Array) -> "NSACache":
    """The state after a step (see write_selection_slots)."""
    return write_selection_slots(self, update, positions)

  def padded(self, slots: int, offset: int = 0) -> "NSACache":
    raise ValueError("An NSA decode cache holds per-row state (compressed blocks, rings) that "
                     "padding cannot place; build it at its final size with "
                     "Transformer.prefill(ids, lengths=..., slots=...).")


def _rows(b: int, ndim: int = 2) -> jax.Array:
  return jnp.arange(b).reshape((b,) + (1,) * (ndim - 1))


def _pad_to(x: jax.Array, size: int) -> jax.Array:
  """x [B,n,...] zero-padded on axis 1 to `size`."""
  return jnp.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


# ---- rings: slot p % size holds position p ----

def ring_positions(first: jax.Array, size: int) -> jax.Array:
  """The position each ring slot j holds when a row's next position is first int[B]: the last
  p < first with p % size == j. -> int[B,size]; negative where the row has none yet."""
  last = jnp.asarray(first, jnp.int32)[:, None] - 1
  return last - jnp.mod(last - jnp.arange(size, dtype=jnp.int32), size)


def ring_from_sequence(x: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
  """x [B,T,...] at positions 0..T-1 -> the ring [B,size,...] of each row's last `size`
  positions before lengths int[B] (zeros where a row is shorter)."""
  pos = ring_positions(lengths, size)
  ring = x[_rows(x.shape[0]), jnp.clip(pos, 0, x.shape[1] - 1)]
  return jnp.where((pos >= 0).reshape(pos.shape + (1,) * (x.ndim - 2)), ring, 0)


def ring_write(ring: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """ring [B,size,...] with the new tokens [B,T,...] at positions int[B,T] written to slots
  p % size; only the last `size` are written (earlier ones would share a slot with them)."""
  size, t = ring.shape[1], new.shape[1]
  slots = jnp.where(jnp.arange(t) >= t - size, jnp.mod(positions, size), size)
  return ring.at[_rows(ring.shape[0]), slots].set(new.astype(ring.dtype), mode="drop")


def ring_in_order(ring: jax.Array, first: jax.Array) -> jax.Array:
  """ring [B,size,...] before a step whose first position is first int[B] -> its entries in
  position order, first-size .. first-1 [B,size,...]."""
  size = ring.shape[1]
  pos = jnp.asarray(first)[:, None] - size + jnp.arange(size, dtype=jnp.int32)
  return ring[_rows(ring.shape[0]), jnp.mod(pos, size)]


# ---- building the state from a prompt ----

def prefill_cache(k: jax.Array, v: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, nsa,
                  lengths: jax.Array | None = None, slots: int | None = None) -> NSACache:
  """The decode state after a prompt. k, v: the prompt's rotated keys/values of the three
  branches (compression, selection, window) [3,B,T,KV,*] at positions 0..T-1; k_cmp/v_cmp its
  compressed blocks [B,C(T),KV,*]; lengths int[B]: each row's prompt length (default T; the
  tokens after it are padding, whose slots and blocks are stale); slots: S (default T)."""
  t = k.shape[2]
  slots = t if slots is None else slots
  if slots < t:
    raise ValueError(f"slots={slots} cannot hold the {t} prompt positions; use slots >= {t}.")
  lengths = jnp.full((k.shape[1],), t, jnp.int32) if lengths is None else lengths
  c = num_compressed_blocks(slots, nsa.compress_block, nsa.compress_stride)
  ring = lambda x, size: ring_from_sequence(x, lengths, size)
  return NSACache(_pad_to(k[1], slots), _pad_to(v[1], slots), _pad_to(k_cmp, c),
                  _pad_to(v_cmp, c), ring(k[0], nsa.compress_block),
                  ring(v[0], nsa.compress_block), ring(k[2], nsa.window),
                  ring(v[2], nsa.window))


# ---- the branches for T new tokens ----

def completed_blocks(positions: jax.Array, length: int, stride: int, capacity: int
                     ) -> jax.Array:
  """int[B,T]: the compressed block that the token at each position completes (block i ends
  at i*d + l - 1), or `capacity` (out of range) where it completes none that fits."""
  start = positions - length + 1
  done = (start >= 0) & (start % stride == 0) & (start // stride < capacity)
  return jnp.where(done, start // stride, capacity)


def update_compressed(k_cmp, v_cmp, k_raw, v_raw, k_new, v_new, positions, length: int,
                      stride: int, phi_k: Callable, phi_v: Callable):
  """The compressed state [B,C,KV,*] with the blocks completed by this step's tokens
  (compression-branch keys/values k_new/v_new [B,T,KV,*] at positions [B,T]) written in.
  A completed block's l tokens come from the ring k_raw/v_raw [B,l,KV,*] and this step's;
  phi_k/phi_v ([B,C,KV,l,*] -> [B,C,KV,*]) run only in steps where some row completes one."""
  c = k_cmp.shape[1]
  if not c:
    return k_cmp, v_cmp
  t = positions.shape[1]
  index = completed_blocks(positions, length, stride, c)
  first = positions[:, 0]
  # Token t's block: positions first+t-l+1 .. first+t, i.e. entries t+1 .. t+l of `recent`
  # (positions first-l .. first+T-1).
  window = np.arange(t)[:, None] + 1 + np.arange(length)[None, :]

  def blocks(ring, new):
    recent = jnp.concatenate([ring_in_order(ring, first), new.astype(ring.dtype)], axis=1)
    return recent[:, window].swapaxes(2, 3)  # [B,T,KV,l,*]

  def compress():
    return (phi_k(blocks(k_raw, k_new)).astype(k_cmp.dtype),
            phi_v(blocks(v_raw, v_new)).astype(v_cmp.dtype))

  def skip():
    return (jnp.zeros(index.shape + k_cmp.shape[2:], k_cmp.dtype),
            jnp.zeros(index.shape + v_cmp.shape[2:], v_cmp.dtype))

  new_k, new_v = jax.lax.cond(jnp.any(index < c), compress, skip)
  rows = _rows(index.shape[0])
  return (k_cmp.at[rows, index].set(new_k, mode="drop"),
          v_cmp.at[rows, index].set(new_v, mode="drop"))


def _attend(q, k, v, allowed, scale: float) -> jax.Array:
  """q [B,T,N,H] over per-query keys k [B,T,KV,S,H], v [B,T,KV,S,Hv], allowed [B,T,KV,S]
  -> [B,T,N,Hv] float32 (zeros for a query with no allowed key): grouped_attention with
  (B,T,KV) as the leading axes, one query of G heads over its own S keys of one KV head."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  o, _ = grouped_attention(q.reshape(b, t, kv, 1, n // kv, h), k[:, :, :, :, None],
                           v[:, :, :, :, None], allowed[:, :, :, None, :], scale)
  return o.reshape(b, t, n, v.shape[-1])


def selected_attention(q, k_cache, v_cache, k_new, v_new, indices, block: int, positions,
                       scale: float) -> jax.Array:
  """Attention of q [B,T,N,H] at positions [B,T] (consecutive per row) over the tokens at
  positions <= its own of its selected blocks indices [B,T,KV,n] (-1: none), gathered: n*l'
  keys per query and KV head, from this step's k_new/v_new [B,T,KV,*] for positions at or
  after the row's first new one and from the cache [B,S,KV,*] before it (k_new/v_new None:
  the cache holds this step's tokens already). -> [B,T,N,Hv]."""
  b, t = positions.shape
  kv = k_cache.shape[2]
  first = positions[:, :1, None, None]  # [B,1,1,1]: gather_selected's per-row query offset
  k_old, allowed = gather_selected(k_cache, indices, block, first)
  v_old, _ = gather_selected(v_cache, indices, block, first)
  if k_new is None:
    return _attend(q, k_old, v_old, allowed, scale)
  pos = (indices[..., None] * block + jnp.arange(block, dtype=jnp.int32)).reshape(b, t, kv, -1)
  fresh = (pos >= first)[..., None]  # this step's tokens are not in the cache yet
  step = jnp.clip(pos - first, 0, t - 1)
  heads = jnp.arange(kv)[None, None, :, None]
  k_sel = jnp.where(fresh, k_new[_rows(b, 4), step, heads].astype(k_old.dtype), k_old)
  v_sel = jnp.where(fresh, v_new[_rows(b, 4), step, heads].astype(v_old.dtype), v_old)
  return _attend(q, k_sel, v_sel, allowed, scale)


def window_attention_decode(q, k_ring, v_ring, k_new, v_new, positions, window: int,
                            scale: float) -> jax.Array:
  """Sliding-window attention of q [B,T,N,H] at positions [B,T] over the ring of the row's
  last positions k_ring/v_ring [B,w,KV,*] and this step's keys k_new/v_new [B,T,KV,*]."""
  ring_pos = ring_positions(positions[:, 0], k_ring.shape[1])
  keys = jnp.concatenate([k_ring, k_new.astype(k_ring.dtype)], axis=1)
  values = jnp.concatenate([v_ring, v_new.astype(v_ring.dtype)], axis=1)
  return window_attention(q, keys, values, positions, jnp.concatenate([ring_pos, positions], 1),
                          window, scale)


def decode_branches(q, k, v, cache: NSACache, positions, nsa, scale: float, phi_k: Callable,
                    phi_v: Callable, write_first: bool = False):
  """The three branches for T new tokens per row.

  q [B,T,N,H] at positions int[B,T] (consecutive per row); k, v: this step's rotated keys and
  values of the three branches (compression, selection, window) [3,B,T,KV,*]; cache: the
  layer's state before the step; phi_k/phi_v: the compression MLPs.
  -> (outputs [3,B,T,N,Hv] float32, block indices int32[B,T,KV,n], the layer's update: an
  NSACache whose k_slc/v_slc are the new tokens' selection keys/values [B,T,KV,*], for the
  caller to write at `positions`, and whose other fields are the state after the step).
  write_first: the new tokens' selection keys/values are first written into the cache's
  k_slc/v_slc, which the selection then reads alone, and the update holds those buffers: a
  donated per-layer cache is then updated in place (reading a buffer that is written
  afterwards makes XLA copy it).
  """
  length, stride = nsa.compress_block, nsa.compress_stride
  k_cmp, v_cmp = update_compressed(cache.k_cmp, cache.v_cmp, cache.k_raw, cache.v_raw, k[0],
                                   v[0], positions, length, stride, phi_k, phi_v)
  o_cmp, indices = compression_and_selection(q, k_cmp, v_cmp, positions,
                                             cache.k_slc.shape[1], nsa, scale)
  if write_first:
    k_slc = write_at_slots(cache.k_slc, k[1], positions, 2)
    v_slc = write_at_slots(cache.v_slc, v[1], positions, 2)
    o_slc = selected_attention(q, k_slc, v_slc, None, None, indices, nsa.select_block,
                               positions, scale)
  else:
    k_slc, v_slc = k[1].astype(cache.k_slc.dtype), v[1].astype(cache.v_slc.dtype)
    o_slc = selected_attention(q, cache.k_slc, cache.v_slc, k[1], v[1], indices,
                               nsa.select_block, positions, scale)
  o_win = window_attention_decode(q, cache.k_win, cache.v_win, k[2], v[2], positions,
                                  nsa.window, scale)
  outs = jnp.stack([o.astype(jnp.float32) for o in (o_cmp, o_slc, o_win)])
  update = NSACache(
      k_slc, v_slc, k_cmp, v_cmp,
      ring_write(cache.k_raw, k[0], positions), ring_write(cache.v_raw, v[0], positions),
      ring_write(cache.k_win, k[2], positions), ring_write(cache.v_win, v[2], positions))
  return outs, indices, update


def write_selection_slots(cache: NSACache, update: NSACache, positions) -> NSACache:
  """A layer's state [B,...] (or a stack's, [L,B,...]) after a step: `update`
  (decode_branches' update) with its new selection keys/values [(L,)B,T,KV,*] written at
  slots positions int[B,T] of the cache's (one in-place scatter when the cache is donated)."""
  return update._replace(k_slc=write_at_slots(cache.k_slc, update.k_slc, positions, 2),
                         v_slc=write_at_slots(cache.v_slc, update.v_slc, positions, 2))


def values_per_token(nsa, slots: int) -> float:
  """Cache values per token per layer that grow with the slots: the selection keys and
  values, plus the compressed state spread over the slots (about 1/d of them). The rings add
  a fixed (l + w) * KV * (H + Hv) values per row and layer."""
  kv_values = nsa.num_kv_heads * (nsa.head_dim + nsa.v_head_dim)
  return kv_values * (1 + num_compressed_blocks(slots, nsa.compress_block,
                                                 nsa.compress_stride) / slots)
