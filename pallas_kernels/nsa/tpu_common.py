"""Pieces shared by the TPU kernels: the math of one (query, key block) pair and the HBM
layouts the kernels read.

Layouts, chosen so that every block and every DMA covers whole trailing dims (Mosaic's tile
rule: the last two dims of a block are multiples of (8, 128) or the full dims):
  q, o, dO, dq  [B,Tp,H,G,*]   a free reshape of [B,T,HQ,*]: one query's G heads are one
                               [G, D] tile (queries zero-padded to Tp, whole grid steps);
  k, v, dk, dv  [B,H,NB*l',*]  kv head-major and zero-padded to whole blocks, so a key block
                               is one contiguous [l', D] slice;
  step table    [B*H*(Tp/tc)*W] per grid step: its tc queries' S block indices and first
                               and last allowed keys, one rank-1 SMEM block (step_table);
  lse, delta    [B,H,Tp/tc,G,tc] lane-dense rows of tc queries; `stats` puts lse and delta
                               side by side, [B,H,Tp/tc,G,2tc]. A kernel takes one query's
                               [G, 1] column with a masked lane reduction (`column`), which
                               avoids both a transpose and a 128x-padded [..., G, 1] array.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NT = (((1,), (1,)), ((), ()))  # a [M,K] x [N,K] -> [M,N] contraction
TN = (((0,), (0,)), ((), ()))  # a [K,M] x [K,N] -> [M,N] contraction
NN = (((1,), (0,)), ((), ()))


def dot(a, b, dims=NN):
  """f32-accumulated matmul; f32 operands at full f32 precision, like the oracles."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                         preferred_element_type=jnp.float32)


def interpret_params(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def key_positions(shape, j, block_size: int):
  """Token positions of key block j along the last dim of a [G, l'] tile."""
  return j * block_size + lax.broadcasted_iota(jnp.int32, shape, 1)


def allowed(shape, j, block_size: int, start, end):
  """bool [G, l']: the keys of block j that a query may read, those in [start, end]."""
  keys = key_positions(shape, j, block_size)
  return (keys <= end) & (keys >= start)


def column(block, c):
  """block [G, W], c a (dynamic) lane index -> block[:, c:c+1] as a [G, 1] column."""
  lanes = lax.broadcasted_iota(jnp.int32, block.shape, 1)
  return jnp.sum(jnp.where(lanes == c, block, 0.), axis=1, keepdims=True)


def probabilities_and_dscores(q, do, lse, delta, k, v, allowed, scale: float):
  """q [G,D], do [G,Dv], lse/delta [G,1], k [l',D], v [l',Dv], allowed [G,l'] ->
  P = exp(scale q k^T - lse) on the allowed keys, and dS = P * (dO v^T - delta)."""
  p = jnp.where(allowed, jnp.exp(dot(q, k, NT) * scale - lse), 0.)
  return p, p * (dot(do, v, NT) - delta)


def check_block_size(block_size: int, *dtypes):
  """A K/V block copy must start on a sublane tile: 8 rows of 32-bit, 16 of 16-bit data."""
  rows = max(8 * max(1, 4 // jnp.dtype(dt).itemsize) for dt in dtypes)
  if block_size % rows:
    raise ValueError(f"selected_attention: block_size={block_size} on TPU with "
                     f"{[jnp.dtype(dt).name for dt in dtypes]} operands; use a multiple of "
                     f"{rows} (whole sublane tiles), or backend='gpu'.")


def check_list_chunk(list_chunk: int, interpret: bool):
  """The dk/dv kernel copies list windows that start at multiples of list_chunk, and Mosaic
  copies a slice of a tiled HBM dim only at a multiple of its 128-lane tile. The interpreter
  has no tiles, so tests may use short windows (many windows per list)."""
  if not interpret and list_chunk % 128:
    raise ValueError(f"selected_attention: BlockSizes.list_chunk={list_chunk} on TPU; use a "
                     "multiple of 128 (Mosaic copies HBM slices at 128-lane offsets only), "
                     "or interpret=True.")


def query_chunk(seq_len: int, tiling) -> int:
  """tc, the queries per grid step: tiling.queries_per_step, or for a shorter sequence the
  power of two >= T (at least 8). A power of two, so a query's chunk and lane are a shift
  and a mask on the scalar core."""
  return min(tiling.queries_per_step, max(8, 1 << max(seq_len - 1, 0).bit_length()))


def grouped(x, num_heads: int, padded_len: int):
  """[B,T,HQ,E] -> [B,Tp,H,G,E] (queries zero-padded to Tp)."""
  b, t, hq, e = x.shape
  x = x.reshape(b, t, num_heads, hq // num_heads, e)
  return jnp.pad(x, ((0, 0), (0, padded_len - t), (0, 0), (0, 0), (0, 0)))


def kv_blocks(x, block_size: int):
  """[B,T,H,E] -> [B,H,NB*l',E], zero-padded to whole blocks."""
  t = x.shape[1]
  x = jnp.transpose(x, (0, 2, 1, 3))
  return jnp.pad(x, ((0, 0), (0, 0), (0, pl.cdiv(t, block_size) * block_size - t), (0, 0)))


def from_kv_blocks(x, seq_len: int):
  """[B,H,NB*l',E] -> [B,T,H,E]."""
  return jnp.transpose(x[:, :, :seq_len], (0, 2, 1, 3))


def smem_block_len(n: int) -> int:
  """The shortest rank-1 SMEM block of at least n int32 that Pallas TPU accepts: a power of
  two >= 128 (one lane row) or, past 1024, a multiple of 1024 (8 sublanes x 128 lanes)."""
  if n <= 1024:
    return max(128, 1 << max(n - 1, 0).bit_length())
  return pl.cdiv(n, 1024) * 1024


def step_table(block_indices, key_start, key_end, tc: int, padded_len: int):
  """The forward / dq kernels' per-step SMEM table: block_indices int32 [B,T,H,S] and each
  query's key_start / key_end int32 [B,T] -> int32 [B*H*(Tp/tc)*W], W = smem_block_len(
  tc*(S+2)). Entry (b, h, step c) is the W-long row [tc*S indices (-1 for padded queries) |
  tc key starts | tc key ends (0 for padded queries) | padding]; one flat rank-1 array,
  because Pallas TPU takes a rank >= 2 SMEM block only if its last two dims are (8, 128)
  multiples or whole dims, which a (b, h, c) block of a [B,H,...] array is not."""
  b, t, h, s = block_indices.shape
  steps = padded_len // tc
  idx = jnp.transpose(block_indices.astype(jnp.int32), (0, 2, 1, 3))
  idx = jnp.pad(idx, ((0, 0), (0, 0), (0, padded_len - t), (0, 0)), constant_values=-1)
  idx = idx.reshape(b, h, steps, tc * s)

  def per_query(x):  # [B,T] -> [B,H,steps,tc], the same for every kv head
    x = jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded_len - t)))
    return jnp.broadcast_to(x.reshape(b, 1, steps, tc), (b, h, steps, tc))
  width = smem_block_len(tc * (s + 2))
  table = jnp.concatenate([idx, per_query(key_start), per_query(key_end)], axis=-1)
  table = jnp.pad(table, ((0, 0), (0, 0), (0, 0), (0, width - tc * (s + 2))))
  return table.reshape(-1)


def block_bounds(starts):
  """QueryLists.starts int32 [B,H,NB+1] -> the dk/dv kernel's SMEM blocks, int32
  [B*H*ceil(NB/128)*256]: block (b, h, j // 128) is [starts[j] for its 128 key blocks j |
  starts[j+1] for the same j], so that step j reads its list's bounds from one aligned
  rank-1 block (Mosaic copies no unaligned slice of a tiled dim)."""
  b, h, nb = starts.shape[0], starts.shape[1], starts.shape[2] - 1
  chunks = pl.cdiv(nb, 128)
  pad = ((0, 0), (0, 0), (0, chunks * 128 - nb))
  first, last = (jnp.pad(x, pad).reshape(b, h, chunks, 1, 128)
                 for x in (starts[:, :, :-1], starts[:, :, 1:]))
  return jnp.concatenate([first, last], axis=3).reshape(-1)


def row_stats(x, num_heads: int, tc: int):
  """f32 [B,T,HQ] -> [B,H,Tp/tc,G,tc] (zero-padded queries)."""
  b, t, hq = x.shape
  tp = pl.cdiv(t, tc) * tc
  x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0)))
  x = x.reshape(b, tp // tc, tc, num_heads, hq // num_heads)
  return jnp.transpose(x, (0, 3, 1, 4, 2))


def stats(lse, delta, num_heads: int, tc: int) -> jax.Array:
  """lse [B,H,Tp/tc,G,tc] (the forward kernel's layout), delta f32 [B,T,HQ] ->
  [B,H,Tp/tc,G,2tc]: lane tc*i + r of a row is (lse, delta)[i] of query r of the chunk."""
  return jnp.concatenate([lse, row_stats(delta, num_heads, tc)], axis=-1)
