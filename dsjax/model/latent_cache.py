"""MLA's decode cache: per layer and token the normalised latent c_kv and the rotated shared
rope key k_pe, kv_lora_rank + qk_rope_head_dim values."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.ops.slots import write_at_slots


class LatentCache(NamedTuple):
  """c_kv [B,S,C] and k_pe [B,S,R] of one layer; a stack adds a leading layer axis ([L,B,S,...],
  or PerLayer buffers, L arrays [B,S,...]: the per-layer layout, see dsjax.model.stack). Slot s
  holds the token at position s."""
  c_kv: jax.Array
  k_pe: jax.Array

  @property
  def slots(self) -> int:
    return slots_of(self)

  def write(self, new: "LatentCache", positions: jax.Array) -> "LatentCache":
    """The cache with new [...,B,T,...] written at slots positions int[B,T]."""
    return write_fields(self, new, positions)

  def padded(self, slots: int, offset: int = 0) -> "LatentCache":
    """This cache of T tokens placed at slots offset..offset+T-1 of a zero cache with `slots`
    slots."""
    return pad_fields(self, slots, offset)


# The slot bookkeeping of caches whose fields are all [...,B,S,F] (one feature axis).

def slots_of(cache) -> int:
  """S of the first field ([...,B,S,F] arrays or PerLayer buffers of them)."""
  c = cache[0]
  return c.arrays[0].shape[-2] if hasattr(c, "arrays") else c.shape[-2]


def write_fields(cache, new, positions: jax.Array):
  """`cache` with every field's new [...,B,T,F] entries written at slots positions int[B,T]."""
  return type(cache)(*(write_at_slots(c, n, positions) for c, n in zip(cache, new)))


def pad_fields(cache, slots: int, offset: int = 0):
  """A cache of T tokens placed at slots offset..offset+T-1 of a zero cache of `slots` slots."""
  t = cache[0].shape[-2]
  if offset + t > slots:
    raise ValueError(f"{offset + t} cache entries do not fit in {slots} slots.")
  def pad(a):
    widths = [(0, 0)] * a.ndim
    widths[-2] = (offset, slots - offset - t)
    return jnp.pad(a, widths)
  return type(cache)(*map(pad, cache))
