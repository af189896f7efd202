"""Mosaic TPU kernels for gmm and tgmm.

The work-item metadata (metadata.py) is scalar-prefetched into SMEM, so the BlockSpec index
maps can pick each step's lhs row tile and expert weights from it. Accumulation is float32 in a
VMEM scratch tile. A row tile that straddles two groups is computed once per group, and each
visit writes only its own rows (a row mask), so no row is ever counted twice.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.metadata import GroupMetadata
from pallas_kernels.gmm.tiling import BlockSizes


def _contract(x, y, x_dim: int, y_dim: int) -> jax.Array:
  return jax.lax.dot_general(x, y, (((x_dim,), (y_dim,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _mask_tail(x, dim: int, start, size: int):
  """Zeros the entries of `x` along `dim` at or past `size` (the ragged last block of a
  contracted dimension holds garbage that would otherwise enter the sum)."""
  index = start + jax.lax.broadcasted_iota(jnp.int32, x.shape, dim)
  return jnp.where(index < size, x, jnp.zeros_like(x))


def _owned_rows(shape, tile, tm: int, lo, hi):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


def _interpret_params(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _gmm_kernel(group_ids, tile_ids, row_starts, row_ends, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, tm: int, tk: int, k_size: int, k_steps: int, transpose_rhs: bool):
  del group_ids  # only used by the index maps
  item, k = pl.program_id(1), pl.program_id(2)
  lo, hi = row_starts[item], row_ends[item]

  @pl.when(k == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(hi > lo)
  def _accumulate():
    lhs, rhs = lhs_ref[...], rhs_ref[...]
    if k_size % tk:
      lhs = _mask_tail(lhs, 1, k * tk, k_size)
      rhs = _mask_tail(rhs, 1 if transpose_rhs else 0, k * tk, k_size)
    acc_ref[...] += _contract(lhs, rhs, 1, 1 if transpose_rhs else 0)

  @pl.when(k == k_steps - 1)
  def _store():
    tile = tile_ids[item]
    first_visit = (item == 0) | (tile != tile_ids[jnp.maximum(item - 1, 0)])
    # The output tile stays in VMEM across consecutive visits of the same row tile: earlier
    # visits' rows are kept, and a first visit starts from zeros (rows of no local group).
    kept = jnp.where(first_visit, jnp.zeros_like(out_ref), out_ref[...])
    owned = _owned_rows(out_ref.shape, tile, tm, lo, hi)
    out_ref[...] = jnp.where(owned, acc_ref[...].astype(out_ref.dtype), kept)


def gmm_tpu(lhs, rhs, meta: GroupMetadata, *, tiling: BlockSizes, out_dtype,
            transpose_rhs: bool, interpret: bool) -> jax.Array:
  """lhs [M,K], rhs [G_local,K,N] ([G_local,N,K] if transpose_rhs) -> [M,N]; `tiling` fitted
  to the shapes (BlockSizes.fit) and `meta` built with its tm.

  Grid (N tiles, work items, K tiles); K innermost so one output tile accumulates in place.
  """
  m, k_size = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  k_steps = pl.cdiv(k_size, tk)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, i, k, g, t, *_: (g[i], j, k))
  else:
    rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, i, k, g, t, *_: (g[i], k, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(pl.cdiv(n, tn), meta.group_ids.shape[0], k_steps),
      in_specs=[pl.BlockSpec((tm, tk), lambda j, i, k, g, t, *_: (t[i], k)), rhs_spec],
      out_specs=pl.BlockSpec((tm, tn), lambda j, i, k, g, t, *_: (t[i], j)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, k_size=k_size, k_steps=k_steps,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_params(interpret), name="gmm",
  )(*meta, lhs, rhs)


def _tgmm_kernel(group_ids, tile_ids, row_starts, row_ends, lhs_ref, rhs_ref, out_ref, acc_ref,
                 *, tm: int):
  item = pl.program_id(2)
  lo, hi = row_starts[item], row_ends[item]
  group = group_ids[item]

  @pl.when((item == 0) | (group != group_ids[jnp.maximum(item - 1, 0)]))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(hi > lo)
  def _accumulate():
    tile = tile_ids[item]
    # Both operands are masked: rows of other groups (or past M) may hold anything.
    lhs = jnp.where(_owned_rows(lhs_ref.shape, tile, tm, lo, hi), lhs_ref[...], 0)
    rhs = jnp.where(_owned_rows(rhs_ref.shape, tile, tm, lo, hi), rhs_ref[...], 0)
    acc_ref[...] += _contract(lhs, rhs, 0, 0)

  # Written every visit (a VMEM store); HBM is written once, when the group changes.
  out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_tpu(lhs, rhs, meta: GroupMetadata, local_groups: int, *, tiling: BlockSizes,
             out_dtype, interpret: bool) -> jax.Array:
  """lhs [M,K] (rows contracted), rhs [M,N] -> [G_local,K,N], out[g] = lhs_g^T @ rhs_g.

  Grid (K tiles, N tiles, work items); items innermost, so each group's visits accumulate
  into one output tile. Every local group has at least one item, so empty groups give zeros.
  """
  m, k_size = lhs.shape
  n = rhs.shape[1]
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(pl.cdiv(k_size, tk), pl.cdiv(n, tn), meta.group_ids.shape[0]),
      in_specs=[pl.BlockSpec((tm, tk), lambda k, j, i, g, t, *_: (t[i], k)),
                pl.BlockSpec((tm, tn), lambda k, j, i, g, t, *_: (t[i], j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda k, j, i, g, t, *_: (g[i], k, j)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((local_groups, k_size, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_params(interpret), name="tgmm",
  )(*meta, lhs, rhs)
