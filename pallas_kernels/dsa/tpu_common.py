"""Pieces shared by the TPU sparse MLA kernels: HBM layouts, BlockSpecs and in-kernel helpers.

The gather copies one latent row per DMA. Mosaic copies a single row only of a 32-bit array:
a bf16 row is half of a packed (16, 128) tile's sublane ("slice sizes along tiled dimensions
must be aligned to tiles"). So the latent is seen as P planes of W channels and stored as
one 32-bit word per plane channel:
  P = 1 (f32 latent): the plane is the latent, W = D;
  P = 2 (bf16): plane 0 holds value channels [0, C/2) and rope channels [C, C + R/2),
    plane 1 value channels [C/2, C) and rope channels [C + R/2, D), W = (C + R) / 2 (odd
    halves are zero-padded); word = plane0 bits | plane1 bits << 16. A kernel splits a
    gathered [rows, W] word block into the two bf16 planes with a shift and a mask, exactly.
Each plane's value channels come first, so the values of a gathered block are the planes'
leading Cp = C/P lanes (a slice from lane 0), and q, dq, o, dO are kept per plane too
([B,T,P,N,*], a plane is a leading-dim index): no kernel slices lanes at an odd offset.
The queries are zero-padded to whole grid steps (Tp) and the index lists to whole chunks of
block_k (Kp) with -1.

Index lists arrive twice per grid step: in SMEM, the rows' DMA offsets (a rank-1 block of a
flat table, smem_table), and in VMEM, [queries, Kp/block_k, block_k], from which a kernel
takes a chunk's validity as a lane row (no scalar-to-vector traffic).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa.tpu_common import NT, dot, smem_block_len


@dataclasses.dataclass(frozen=True)
class Planes:
  """The plane view of a latent of `dim` = D channels whose first `v_dim` = C are values."""
  count: int  # P
  value: int  # Cp, value channels per plane
  rope: int   # Rp, the other channels per plane
  v_dim: int
  dim: int

  @property
  def width(self) -> int:
    return self.value + self.rope


def planes_for(dim: int, v_dim: int, dtype) -> Planes:
  count = 2 if jnp.dtype(dtype).itemsize == 2 else 1
  return Planes(count, -(-v_dim // count), -(-(dim - v_dim) // count), v_dim, dim)


def _pad_to(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def to_planes(x: jax.Array, planes: Planes, value_only: bool = False) -> jax.Array:
  """[..., D] (or [..., C] with value_only) -> [..., P, W] (or [..., P, Cp]), zero-padded;
  slices and pads only (an XLA gather would be slow on TPU)."""
  cp, rp, c = planes.value, planes.rope, planes.v_dim
  result = []
  for p in range(planes.count):
    part = [_pad_to(x[..., p * cp:min((p + 1) * cp, c)], cp)]
    if not value_only:
      part.append(_pad_to(x[..., c + p * rp:min(c + (p + 1) * rp, planes.dim)], rp))
    result.append(jnp.concatenate(part, axis=-1))
  return jnp.stack(result, axis=-2)


def from_planes(x: jax.Array, planes: Planes, value_only: bool = False) -> jax.Array:
  """The inverse of to_planes: [..., P, W] (or [..., P, Cp]) -> [..., D] (or [..., C])."""
  cp = planes.value
  values = jnp.concatenate([x[..., p, :cp] for p in range(planes.count)], axis=-1)
  if value_only:
    return values[..., :planes.v_dim]
  rope = jnp.concatenate([x[..., p, cp:] for p in range(planes.count)], axis=-1)
  return jnp.concatenate([values[..., :planes.v_dim], rope[..., :planes.dim - planes.v_dim]],
                         axis=-1)


def to_words(latent: jax.Array, planes: Planes) -> jax.Array:
  """latent [B,S,D] -> the gathered HBM array [B,S,W]: f32 itself (P = 1), or int32 words
  holding both bf16 planes (P = 2)."""
  x = to_planes(latent, planes)
  if planes.count == 1:
    return x[..., 0, :]
  bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
  return bits[..., 0, :] | lax.shift_left(bits[..., 1, :], 16)


def from_words(words: jax.Array, planes: Planes, dtype) -> list:
  """In a kernel: a gathered [rows, W] block -> the P planes [rows, W] in dtype."""
  if planes.count == 1:
    return [words.astype(dtype)]
  # A bf16's bits are the high half of the f32 of the same value.
  low = lax.bitcast_convert_type(lax.shift_left(words, 16), jnp.float32)
  high = lax.bitcast_convert_type(words & jnp.int32(-65536), jnp.float32)
  return [low.astype(dtype), high.astype(dtype)]


def query_chunk(seq_len: int, queries_per_step: int) -> int:
  """tq: queries_per_step, or for a shorter sequence the power of two >= T (at least 8)."""
  return min(queries_per_step, max(8, 1 << max(seq_len - 1, 0).bit_length()))


def pad_queries(x: jax.Array, padded_len: int, value=0) -> jax.Array:
  """[B,T,...] -> [B,Tp,...], padded with `value`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, padded_len - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def padded_indices(indices: jax.Array, padded_len: int, block_k: int) -> jax.Array:
  """int32 [B,T,K] (-1 = none) -> [B,Tp,Kp], -1 in the padding (Kp: whole chunks)."""
  k = indices.shape[-1]
  indices = jnp.pad(indices, ((0, 0), (0, 0), (0, -(-k // block_k) * block_k - k)),
                    constant_values=-1)
  return pad_queries(indices, padded_len, -1)


def smem_table(indices: jax.Array, tq: int) -> jax.Array:
  """[B,Tp,Kp] -> int32 [B*(Tp/tq)*Wsm]: grid step (b, i)'s tq*Kp indices as one row of Wsm
  = smem_block_len(tq*Kp) entries (rank 1, because Pallas TPU takes a rank >= 2 SMEM block
  only when its last two dims are (8, 128) multiples or whole dims)."""
  b, tp, kp = indices.shape
  width = smem_block_len(tq * kp)
  rows = indices.reshape(b, tp // tq, tq * kp)
  return jnp.pad(rows, ((0, 0), (0, 0), (0, width - tq * kp)), constant_values=-1).reshape(-1)


def vmem_table(indices: jax.Array, block_k: int) -> jax.Array:
  """[B,Tp,Kp] -> [B,Tp,Kp/block_k,block_k] (a free reshape)."""
  b, tp, kp = indices.shape
  return indices.reshape(b, tp, kp // block_k, block_k)


def index_specs(tq: int, steps: int, kp: int, block_k: int):
  """BlockSpecs of the SMEM table (smem_table) and the VMEM index block."""
  width = smem_block_len(tq * kp)
  return [pl.BlockSpec((width,), lambda bi, i: (bi * steps + i,), memory_space=pltpu.SMEM),
          pl.BlockSpec((None, tq, kp // block_k, block_k), lambda bi, i: (bi, i, 0, 0))]


def query_rows(tq: int, *trailing):
  """The step's tq queries of a [B,Tp,*trailing] array."""
  return pl.BlockSpec((None, tq, *trailing), lambda bi, i: (bi, i) + (0,) * len(trailing))


def compiler_params(tiling) -> pltpu.CompilerParams:
  """Both grid dims (batch rows, query steps) are independent: megacore may split either."""
  limit = tiling.vmem_limit_mib
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                              vmem_limit_bytes=None if limit is None else limit * 2**20)


def select_row(block: jax.Array, r) -> jax.Array:
  """[R, X], r a (dynamic) row -> block[r:r+1] as [1, X], by a masked sublane sum."""
  rows = lax.broadcasted_iota(jnp.int32, block.shape, 0)
  return jnp.sum(jnp.where(rows == r, block, jnp.zeros_like(block)), axis=0, keepdims=True)


def _diagonal(n: int):
  return lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)


def column_to_row(col: jax.Array) -> jax.Array:
  """[N, 1] -> [1, N] without a transpose: the diagonal of the lane broadcast, summed over
  sublanes (exact: the other terms are 0; -inf stays -inf)."""
  n = col.shape[0]
  return jnp.sum(jnp.where(_diagonal(n), jnp.broadcast_to(col, (n, n)), 0.), axis=0,
                 keepdims=True)


def row_to_column(row: jax.Array) -> jax.Array:
  """[1, N] -> [N, 1], as column_to_row."""
  n = row.shape[1]
  return jnp.sum(jnp.where(_diagonal(n), jnp.broadcast_to(row, (n, n)), 0.), axis=1,
                 keepdims=True)


def chunk_valid(idx_vmem, r, c) -> jax.Array:
  """bool [1, block_k]: which rows of query r's chunk c name a key, from the step's VMEM
  index block [tq, Kp/block_k, block_k]."""
  valid = (idx_vmem[r] >= 0).astype(jnp.float32)
  return select_row(valid, c) > 0.5


def logits(q_planes, kv_planes, scale: float) -> jax.Array:
  """q planes [N, W] and gathered planes [rows, W] -> f32 [N, rows] scaled logits."""
  total = sum(dot(q, kv, NT) for q, kv in zip(q_planes, kv_planes))
  return total * scale
