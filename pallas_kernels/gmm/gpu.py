"""Grouped matmul kernels for GPUs (Pallas' Triton backend).

Refs are whole arrays in global memory (no BlockSpecs): each program computes its tile
offsets from the work-item metadata and reads/writes through masked loads and stores. Masks
do double duty: they cut the tiles at the array edges (M, K, N need not be multiples of the
tiles, Triton tensors must be powers of two) and they select the rows a work item owns, so no
padding of the operands is ever materialised.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm.metadata import GroupMetadata
from pallas_kernels.gmm.tiling import BlockSizes


def _dot(a, b, **transposes):
  """a @ b (optionally transposed) accumulated in f32. Triton lowers a DEFAULT-precision f32
  dot to TF32 (~1e-3 relative error), so f32 operands ask for HIGHEST (IEEE f32, like the
  oracles); bf16/f16 keep DEFAULT, the precision-neutral path jax's own Triton kernels use.
  tt.dot needs one operand dtype, so mixed operands meet at their promoted type."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return plgpu.dot(a.astype(dtype), b.astype(dtype), precision=precision, **transposes)


def _compiler_params(tiling: BlockSizes):
  return plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _gmm_kernel(group_ids_ref, tile_ids_ref, row_starts_ref, row_ends_ref, bounds_ref,
                lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, transpose_rhs):
  """One (work item, column tile): out[tile rows, cols] for the rows the item owns."""
  m, k = lhs_ref.shape
  n = out_ref.shape[1]
  item, col_block = pl.program_id(0), pl.program_id(1)
  tile, group = tile_ids_ref[item], group_ids_ref[item]
  row_start, row_end = row_starts_ref[item], row_ends_ref[item]
  row0, col0 = tile * tm, col_block * tn
  rows = row0 + jnp.arange(tm)
  cols = col0 + jnp.arange(tn)
  owned = (rows >= row_start) & (rows < row_end)
  col_ok = cols < n

  def k_step(step, acc):
    ks = step * tk + jnp.arange(tk)
    k_ok = ks < k
    # Rows the item does not own load as 0, so they contribute nothing (and stay 0 below).
    a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(step * tk, tk)],
                   mask=owned[:, None] & k_ok[None, :], other=0.)
    if transpose_rhs:  # rhs[group] is [N, K]: contract both operands' last dim.
      b = plgpu.load(rhs_ref.at[group, pl.ds(col0, tn), pl.ds(step * tk, tk)],
                     mask=col_ok[:, None] & k_ok[None, :], other=0.)
      return acc + _dot(a, b, trans_b=True)
    b = plgpu.load(rhs_ref.at[group, pl.ds(step * tk, tk), pl.ds(col0, tn)],
                   mask=k_ok[:, None] & col_ok[None, :], other=0.)
    return acc + _dot(a, b)

  # Items that own no rows (a tile visited only to zero it, padding items) skip the K loop:
  # a zero trip count keeps a single scf.for, which Triton still software-pipelines.
  # int32 operands: with Python ints, Pallas' Triton lowering gives the trip count a type
  # other than i32 and Triton rejects the scf.for.
  num_steps = jnp.where(row_end > row_start, jnp.int32(pl.cdiv(k, tk)), jnp.int32(0))
  acc = lax.fori_loop(0, num_steps, k_step, jnp.zeros((tm, tn), jnp.float32))

  # The first item of a tile also writes the tile's rows that no local group owns: its acc is
  # exactly 0 there. Items of one tile own disjoint rows, so their masked stores never race.
  prev_tile = tile_ids_ref[jnp.maximum(item - 1, 0)]
  first_of_tile = (item == 0) | (prev_tile != tile)
  nonlocal_rows = (rows < bounds_ref[0]) | (rows >= bounds_ref[1])
  write = (owned | (first_of_tile & nonlocal_rows)) & (rows < m)
  plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
              mask=write[:, None] & col_ok[None, :])


def gmm_gpu(lhs, rhs, meta: GroupMetadata, local_start, local_end, *, tiling: BlockSizes,
            out_dtype, transpose_rhs: bool, interpret: bool) -> jax.Array:
  """lhs [M,K], rhs [G_local,K,N] (or [G_local,N,K] when transpose_rhs) -> out [M,N] of
  out_dtype. `tiling` from BlockSizes.fit (powers of two >= 16);
  meta = make_group_metadata(group_sizes, M, tiling.tm, group_offset, G_local);
  local_start/local_end: int32 scalars, rows [local_start, local_end) belong to local groups.
  Rows outside that range must come out as exact zeros."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  num_items = meta.group_ids.shape[0]
  bounds = jnp.stack([jnp.asarray(local_start, jnp.int32), jnp.asarray(local_end, jnp.int32)])
  kernel = functools.partial(_gmm_kernel, tm=tiling.tm, tk=tiling.tk, tn=tiling.tn,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_items, pl.cdiv(n, tiling.tn)),
      compiler_params=_compiler_params(tiling),
      interpret=interpret,
      name="gmm_gpu",
  )(*(x.astype(jnp.int32) for x in meta), bounds, lhs, rhs)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn):
  """One (group, K tile, N tile): out[g, ks, cols] = lhs[rows of g, ks].T @ rhs[rows of g, cols]."""
  k, n = lhs_ref.shape[1], rhs_ref.shape[1]
  group, k_block, col_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[group], ends_ref[group]
  k0, col0 = k_block * tk, col_block * tn
  k_ok = (k0 + jnp.arange(tk)) < k
  col_ok = (col0 + jnp.arange(tn)) < n

  def row_step(step, acc):
    row0 = start + step * tm
    # Rows past the group's end (next group's rows, or past M) load as 0 and add nothing.
    row_ok = (row0 + jnp.arange(tm)) < end
    a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                   mask=row_ok[:, None] & k_ok[None, :], other=0.)
    b = plgpu.load(rhs_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.)
    return acc + _dot(a, b, trans_a=True)

  # Dynamic trip count (the group's size); an empty group runs no step and stores zeros.
  num_steps = pl.cdiv(jnp.maximum(end - start, 0), tm)
  acc = lax.fori_loop(0, num_steps, row_step, jnp.zeros((tk, tn), jnp.float32))
  plgpu.store(out_ref.at[group, pl.ds(k0, tk), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
              mask=k_ok[:, None] & col_ok[None, :])


def tgmm_gpu(lhs, rhs, starts, ends, *, tiling: BlockSizes, out_dtype,
             interpret: bool) -> jax.Array:
  """lhs [M,K] (NOTE: row-major, rows are the contracted dim; the public tgmm takes [K,M] and
  transposes), rhs [M,N], starts/ends int32[G_local] (rows of each local group) ->
  out [G_local,K,N], out[g] = lhs[starts[g]:ends[g]].T @ rhs[starts[g]:ends[g]]; empty groups
  give zeros."""
  k, n = lhs.shape[1], rhs.shape[1]
  local_groups = starts.shape[0]
  kernel = functools.partial(_tgmm_kernel, tm=tiling.tm, tk=tiling.tk, tn=tiling.tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((local_groups, k, n), out_dtype),
      grid=(local_groups, pl.cdiv(k, tiling.tk), pl.cdiv(n, tiling.tn)),
      compiler_params=_compiler_params(tiling),
      interpret=interpret,
      name="tgmm_gpu",
  )(starts.astype(jnp.int32), ends.astype(jnp.int32), lhs, rhs)
