"""Selected-block attention kernels for GPUs (Pallas' Triton backend).

Group-centric, as in the NSA paper: a program owns one query t and one kv head h, loads the
G query heads of that group as one [G, D] tile and streams the S selected key/value blocks
through it, so each selected block is read once per group rather than once per query head.
Refs are whole arrays in global memory; masked loads cut the blocks at the sequence end,
after the query's last allowed key (its position, or key_end), before its first (key_start:
packed documents) and at the power-of-two padding Triton tiles need (tl.dot wants every dim
>= 16, so G=1 or l'=8 run on padded tiles whose extra rows/columns are masked out).

  forward: grid (T, B*H), online softmax over the S blocks, f32 accumulation; saves lse.
  dq:      grid (T, B*H), the same walk, recomputing probabilities from lse.
  dk/dv:   grid (key blocks, B*H); each program walks the queries that selected its block
           (metadata.block_query_lists), so every dk/dv row is written once, by one program.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nsa.metadata import selects_block


def _tile(n: int) -> int:
  """Triton tile for a dimension of n: a power of two, at least 16 (tl.dot's minimum)."""
  return max(16, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class _Dims:
  seq_len: int
  num_heads: int
  group: int
  head_dim: int
  value_dim: int
  block_size: int
  scale: float

  @property
  def tiles(self):
    return (_tile(self.group), _tile(self.head_dim), _tile(self.value_dim),
            _tile(self.block_size))


def _dot(a, b, **transposes):
  """f32 accumulation. Triton lowers a DEFAULT-precision f32 dot to TF32, so f32 operands ask
  for HIGHEST (IEEE, like the oracles); bf16 stays on the tensor cores' native path."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return plgpu.dot(a.astype(dtype), b.astype(dtype), precision=precision, **transposes)


def _load(ref, row_ok, col_ok):
  return plgpu.load(ref, mask=row_ok[:, None] & col_ok[None, :], other=0.)


def _group_rows(ref, b, t, h, width, dims: _Dims):
  """The [G_tile, width] tile of query/output rows (b, t, h*G .. h*G+G-1) of a [B,T,H,G,*]
  ref, masked to the G heads and the real columns."""
  g_tile = dims.tiles[0]
  rows_ok = jnp.arange(g_tile) < dims.group
  cols_ok = jnp.arange(_tile(width)) < width
  return ref.at[b, t, h, pl.ds(0, g_tile), pl.ds(0, _tile(width))], rows_ok, cols_ok


def _key_block(ref, b, h, j, width, dims: _Dims):
  """Rows j*l' .. j*l'+l'-1 (cut at T) of kv head h of a [B,T,H,*] ref: (tile, row mask)."""
  l_tile = dims.tiles[3]
  offs = jnp.arange(l_tile)
  rows_ok = (offs < dims.block_size) & (j * dims.block_size + offs < dims.seq_len)
  cols_ok = jnp.arange(_tile(width)) < width
  sub = ref.at[b, pl.ds(j * dims.block_size, l_tile), h, pl.ds(0, _tile(width))]
  return _load(sub, rows_ok, cols_ok), rows_ok


def _allowed(j, start, end, key_ok, dims: _Dims):
  """Which of key block j's tile rows a query may read: in the sequence, in [start, end]."""
  key_pos = j * dims.block_size + jnp.arange(dims.tiles[3])
  return key_ok & (key_pos <= end) & (key_pos >= start)


def _program_ids(dims: _Dims):
  bh = pl.program_id(1)
  return bh // dims.num_heads, bh % dims.num_heads


def _fwd_kernel(idx_ref, start_ref, end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                dims: _Dims, num_slots: int):
  t = pl.program_id(0)
  b, h = _program_ids(dims)
  g_tile, _, v_tile, _ = dims.tiles
  start, end = start_ref[b, t], end_ref[b, t]
  q = _load(*_group_rows(q_ref, b, t, h, dims.head_dim, dims))

  def attend(j, carry):
    m, denom, acc = carry
    kb, key_ok = _key_block(k_ref, b, h, j, dims.head_dim, dims)
    vb, _ = _key_block(v_ref, b, h, j, dims.value_dim, dims)
    allowed = _allowed(j, start, end, key_ok, dims)
    scores = jnp.where(allowed[None, :], _dot(q, kb, trans_b=True) * dims.scale, -jnp.inf)
    # The block has an allowed key (selects_block), so m_new is finite on every row.
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.astype(vb.dtype), vb)
    return m_new, denom * alpha + jnp.sum(p, axis=1), acc

  def slot(s, carry):
    j = idx_ref[b, t, h, s]
    return lax.cond(selects_block(j, dims.block_size, end, start),
                    functools.partial(attend, j), lambda c: c, carry)

  init = (jnp.full((g_tile,), -jnp.inf, jnp.float32), jnp.zeros((g_tile,), jnp.float32),
          jnp.zeros((g_tile, v_tile), jnp.float32))
  m, denom, acc = lax.fori_loop(0, num_slots, slot, init)
  # A query none of whose blocks has an allowed key gives 0 and lse -inf, not NaN.
  nonempty = denom > 0
  safe = jnp.where(nonempty, denom, 1.)
  o_sub, rows_ok, cols_ok = _group_rows(o_ref, b, t, h, dims.value_dim, dims)
  plgpu.store(o_sub, (acc / safe[:, None]).astype(o_ref.dtype),
              mask=rows_ok[:, None] & cols_ok[None, :])
  lse = jnp.where(nonempty, m + jnp.log(safe), -jnp.inf)
  plgpu.store(lse_ref.at[b, t, h, pl.ds(0, g_tile)], lse, mask=rows_ok)


def _row_stats(ref, b, t, h, dims: _Dims):
  g_tile = dims.tiles[0]
  return plgpu.load(ref.at[b, t, h, pl.ds(0, g_tile)], mask=jnp.arange(g_tile) < dims.group,
                    other=0.)


def _probabilities_and_dscores(q, do, lse, delta, kb, vb, allowed, dims: _Dims):
  """Recomputed P = exp(scale q k^T - lse) on the allowed keys, and dS = P * (dP - delta)
  with dP = dO v^T (the softmax backward; delta = rowsum(dO * O))."""
  scores = _dot(q, kb, trans_b=True) * dims.scale
  p = jnp.where(allowed, jnp.exp(scores - lse[:, None]), 0.)
  dp = _dot(do, vb, trans_b=True)
  return p, p * (dp - delta[:, None])


def _dq_kernel(idx_ref, start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, dims: _Dims, num_slots: int):
  t = pl.program_id(0)
  b, h = _program_ids(dims)
  g_tile, d_tile, _, _ = dims.tiles
  start, end = start_ref[b, t], end_ref[b, t]
  q = _load(*_group_rows(q_ref, b, t, h, dims.head_dim, dims))
  do = _load(*_group_rows(do_ref, b, t, h, dims.value_dim, dims))
  lse, delta = _row_stats(lse_ref, b, t, h, dims), _row_stats(delta_ref, b, t, h, dims)

  def grad(j, acc):
    kb, key_ok = _key_block(k_ref, b, h, j, dims.head_dim, dims)
    vb, _ = _key_block(v_ref, b, h, j, dims.value_dim, dims)
    allowed = _allowed(j, start, end, key_ok, dims)
    _, ds = _probabilities_and_dscores(q, do, lse, delta, kb, vb, allowed[None, :], dims)
    return acc + _dot(ds.astype(kb.dtype), kb)

  def slot(s, acc):
    j = idx_ref[b, t, h, s]
    return lax.cond(selects_block(j, dims.block_size, end, start),
                    functools.partial(grad, j), lambda a: a, acc)

  acc = lax.fori_loop(0, num_slots, slot, jnp.zeros((g_tile, d_tile), jnp.float32))
  dq_sub, rows_ok, cols_ok = _group_rows(dq_ref, b, t, h, dims.head_dim, dims)
  plgpu.store(dq_sub, (acc * dims.scale).astype(dq_ref.dtype),
              mask=rows_ok[:, None] & cols_ok[None, :])


def _dkdv_kernel(starts_ref, queries_ref, key_starts_ref, key_ends_ref, q_ref, k_ref, v_ref,
                 do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, dims: _Dims):
  j = pl.program_id(0)
  b, h = _program_ids(dims)
  _, d_tile, v_tile, l_tile = dims.tiles
  kb, key_ok = _key_block(k_ref, b, h, j, dims.head_dim, dims)
  vb, _ = _key_block(v_ref, b, h, j, dims.value_dim, dims)

  def visit(e, carry):
    dk, dv = carry
    t = queries_ref[b, h, e]
    q_sub, rows_ok, cols_ok = _group_rows(q_ref, b, t, h, dims.head_dim, dims)
    q = _load(q_sub, rows_ok, cols_ok)
    do = _load(*_group_rows(do_ref, b, t, h, dims.value_dim, dims))
    lse, delta = _row_stats(lse_ref, b, t, h, dims), _row_stats(delta_ref, b, t, h, dims)
    first, last = key_starts_ref[b, h, e], key_ends_ref[b, h, e]
    allowed = rows_ok[:, None] & _allowed(j, first, last, key_ok, dims)[None, :]
    p, ds = _probabilities_and_dscores(q, do, lse, delta, kb, vb, allowed, dims)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  # Dynamic trip count: the length of this block's query list (0 for an unselected block,
  # which then stores zeros).
  init = (jnp.zeros((l_tile, d_tile), jnp.float32), jnp.zeros((l_tile, v_tile), jnp.float32))
  dk, dv = lax.fori_loop(starts_ref[b, h, j], starts_ref[b, h, j + 1], visit, init)
  for ref, value, width in ((dk_ref, dk * dims.scale, dims.head_dim),
                            (dv_ref, dv, dims.value_dim)):
    cols_ok = jnp.arange(_tile(width)) < width
    sub = ref.at[b, pl.ds(j * dims.block_size, l_tile), h, pl.ds(0, _tile(width))]
    plgpu.store(sub, value.astype(ref.dtype), mask=key_ok[:, None] & cols_ok[None, :])


def _dims(q, k, v, block_size: int, scale: float) -> _Dims:
  _, t, hq, d = q.shape
  h = k.shape[2]
  return _Dims(t, h, hq // h, d, v.shape[-1], block_size, float(scale))


def _call(kernel, out_shape, grid, tiling, interpret: bool, name: str):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages))


def _grouped(x, dims: _Dims):
  """[B,T,HQ,E] -> [B,T,H,G,E] (a free reshape): a group's heads are adjacent rows."""
  b, t, _, e = x.shape
  return x.reshape(b, t, dims.num_heads, dims.group, e)


def forward_gpu(q, k, v, block_indices, key_range, block_size: int, scale: float, *, tiling,
                interpret: bool):
  """q [B,T,HQ,D], k [B,T,H,D], v [B,T,H,Dv], block_indices int32 [B,T,H,S], key_range =
  (key_start, key_end) int32 [B,T] -> (o [B,T,HQ,Dv] in q's dtype, lse f32 [B,T,HQ])."""
  dims = _dims(q, k, v, block_size, scale)
  b, t, hq, _ = q.shape
  out_shape = (jax.ShapeDtypeStruct((b, t, dims.num_heads, dims.group, dims.value_dim),
                                    q.dtype),
               jax.ShapeDtypeStruct((b, t, dims.num_heads, dims.group), jnp.float32))
  kernel = functools.partial(_fwd_kernel, dims=dims, num_slots=block_indices.shape[-1])
  o, lse = _call(kernel, out_shape, (t, b * dims.num_heads), tiling, interpret,
                 "nsa_selected_fwd_gpu")(block_indices, *key_range, _grouped(q, dims), k, v)
  return o.reshape(b, t, hq, dims.value_dim), lse.reshape(b, t, hq)


def backward_gpu(q, k, v, block_indices, key_range, lse, delta, do, lists, block_size: int,
                 scale: float, *, tiling, interpret: bool):
  """The gradients (dq, dk, dv) in the dtypes of (q, k, v). lse, delta f32 [B,T,HQ];
  do [B,T,HQ,Dv]; lists = metadata.block_query_lists(...)."""
  dims = _dims(q, k, v, block_size, scale)
  b, t, hq, d = q.shape
  qg, dog = _grouped(q, dims), _grouped(do, dims)
  lse, delta = (x.reshape(b, t, dims.num_heads, dims.group) for x in (lse, delta))
  dq_kernel = functools.partial(_dq_kernel, dims=dims, num_slots=block_indices.shape[-1])
  dq = _call(dq_kernel, jax.ShapeDtypeStruct(qg.shape, q.dtype), (t, b * dims.num_heads),
             tiling, interpret, "nsa_selected_dq_gpu")(
                 block_indices, *key_range, qg, k, v, dog, lse, delta)
  queries, starts, key_starts, key_ends = lists
  num_blocks = starts.shape[-1] - 1
  dk, dv = _call(functools.partial(_dkdv_kernel, dims=dims),
                 (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                 (num_blocks, b * dims.num_heads), tiling, interpret, "nsa_selected_dkdv_gpu")(
                     starts, queries, key_starts, key_ends, qg, k, v, dog, lse, delta)
  return dq.reshape(b, t, hq, d), dk, dv
