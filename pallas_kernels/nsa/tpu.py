"""Mosaic TPU kernels for selected-block attention: forward and dq, and the TPU entry points.

Group-centric: a grid step (b, h, c) owns tc consecutive queries of one batch row and kv head
and walks, query by query, their S selected key blocks. The G query heads of the group are
one [G, D] tile, so each selected K/V block is copied from HBM once per group.

SMEM: the block indices are not scalar-prefetched (T*S int32 outgrow SMEM at long context).
Each step's tc*S entries, with its tc queries' first and last allowed keys (key_start,
key_end), arrive as one rank-1 SMEM BlockSpec block of a step table (tpu_common.step_table),
which the Pallas pipeline copies in step by step, so SMEM use does not grow with T.

K/V stay in HBM (memory_space ANY): a BlockSpec index map names one block per step, so the
kernel copies the selected blocks itself, double buffered (the next selected block is in
flight while the current one is used), and copies nothing for -1 or for a block wholly after
the query. Layouts: tpu_common.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa import tpu_common as common
from pallas_kernels.nsa import tpu_dkdv
from pallas_kernels.nsa.metadata import selects_block


def _stream_selected_blocks(rows: int, num_slots: int, block_of, copies, row_start, visit,
                            row_end, step_carry=()):
  """Walks the rows r < rows of a grid step and, in slot order, their selected blocks:
    operands, state = row_start(r)
    state = visit(r, operands, j, buffer, state)  for each slot whose block_of(r, s) = j >= 0
    step_carry = row_end(r, state, step_carry)
  and returns the final step_carry. copies(j, buffer) are the DMAs that bring block j into
  buffer 0 or 1. The next item's copy starts before the current item waits, so one copy is
  in flight behind each visit; every started copy is waited on within the step. State is
  loop-carried (values, not VMEM scratch), and so is the next item's block index, read from
  SMEM once per item.
  """
  def start(j, buffer):
    @pl.when(j >= 0)
    def _():
      for copy in copies(j, buffer):
        copy.start()

  def row(r, carry):
    item, j, step = carry
    operands, state = row_start(r)

    def slot(s, carry):
      item, j, state = carry
      buffer = jnp.bitwise_and(item, 1)
      last_slot = s + 1 == num_slots
      next_r, next_s = jnp.where(last_slot, r + 1, r), jnp.where(last_slot, 0, s + 1)
      # Clamped so the SMEM read stays in the block; past the last row nothing is copied.
      next_j = block_of(jnp.minimum(next_r, rows - 1), next_s)
      next_j = jnp.where(next_r < rows, next_j, -1)
      start(next_j, 1 - buffer)

      def run(state):
        for copy in copies(j, buffer):
          copy.wait()
        return visit(r, operands, j, buffer, state)

      return item + 1, next_j, lax.cond(j >= 0, run, lambda state: state, state)

    item, j, state = lax.fori_loop(0, num_slots, slot, (item, j, state))
    return item, j, row_end(r, state, step)

  first = block_of(0, 0)
  start(first, 0)
  return lax.fori_loop(0, rows, row, (jnp.int32(0), first, step_carry))[2]


def _block_copies(k_hbm, v_hbm, k_buf, v_buf, sems, block_size: int):
  b, h = pl.program_id(0), pl.program_id(1)

  def copies(j, buffer):
    rows = pl.ds(j * block_size, block_size)
    return (pltpu.make_async_copy(k_hbm.at[b, h, rows], k_buf.at[buffer], sems.at[0, buffer]),
            pltpu.make_async_copy(v_hbm.at[b, h, rows], v_buf.at[buffer], sems.at[1, buffer]))
  return copies


def _key_range(table_ref, tc: int, num_slots: int):
  """row r -> (first, last) allowed key of the step's query r, from its SMEM table
  (tpu_common.step_table)."""
  def key_range(r):
    return table_ref[tc * num_slots + r], table_ref[tc * (num_slots + 1) + r]
  return key_range


def _block_of(table_ref, key_range, num_slots: int, block_size: int):
  """(row, slot) -> the selected block, or -1 where the entry adds nothing."""
  def block_of(r, s):
    j = table_ref[r * num_slots + s]
    start, end = key_range(r)
    return jnp.where(selects_block(j, block_size, end, start), j, -1)
  return block_of


def _fwd_kernel(table_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf, sems, *, tc: int,
                num_slots: int, block_size: int, scale: float):
  g, dv = o_ref.shape[1], o_ref.shape[2]
  key_range = _key_range(table_ref, tc, num_slots)

  def row_start(r):
    return q_ref[r], (jnp.full((g, 1), -jnp.inf, jnp.float32),
                      jnp.zeros((g, 1), jnp.float32), jnp.zeros((g, dv), jnp.float32))

  def visit(r, q, j, buffer, state):
    m_prev, denom, acc = state
    scores = common.dot(q, k_buf[buffer], common.NT) * scale
    # The block has an allowed key (selects_block), so m_new is finite on every row.
    allowed = common.allowed(scores.shape, j, block_size, *key_range(r))
    scores = jnp.where(allowed, scores, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new)
    v = v_buf[buffer]
    return (m_new, alpha * denom + jnp.sum(p, axis=1, keepdims=True),
            alpha * acc + common.dot(p.astype(v.dtype), v))

  def row_end(r, state, lse_rows):
    m, denom, acc = state
    # A query none of whose blocks has an allowed key gives 0 and lse -inf, not NaN.
    nonempty = denom > 0
    safe = jnp.where(nonempty, denom, 1.)
    o_ref[r] = (acc / safe).astype(o_ref.dtype)
    lse = jnp.where(nonempty, m + jnp.log(safe), -jnp.inf)
    lanes = lax.broadcasted_iota(jnp.int32, lse_rows.shape, 1)
    return jnp.where(lanes == r, lse, lse_rows)

  lse_ref[...] = _stream_selected_blocks(
      tc, num_slots, _block_of(table_ref, key_range, num_slots, block_size),
      _block_copies(k_hbm, v_hbm, k_buf, v_buf, sems, block_size), row_start, visit, row_end,
      jnp.zeros(lse_ref.shape, jnp.float32))


def _dq_kernel(table_ref, q_ref, k_hbm, v_hbm, do_ref, stats_ref, dq_ref, k_buf, v_buf, sems, *,
               tc: int, num_slots: int, block_size: int, scale: float):
  g, d = dq_ref.shape[1], dq_ref.shape[2]
  key_range = _key_range(table_ref, tc, num_slots)

  def row_start(r):
    stats = stats_ref[...]
    operands = (q_ref[r], do_ref[r], common.column(stats, r), common.column(stats, tc + r))
    return operands, jnp.zeros((g, d), jnp.float32)

  def visit(r, operands, j, buffer, acc):
    k = k_buf[buffer]
    allowed = common.allowed((g, block_size), j, block_size, *key_range(r))
    _, ds = common.probabilities_and_dscores(*operands, k, v_buf[buffer], allowed, scale)
    return acc + common.dot(ds.astype(k.dtype), k)

  def row_end(r, acc, step):
    dq_ref[r] = (acc * scale).astype(dq_ref.dtype)
    return step

  _stream_selected_blocks(tc, num_slots,
                          _block_of(table_ref, key_range, num_slots, block_size),
                          _block_copies(k_hbm, v_hbm, k_buf, v_buf, sems, block_size),
                          row_start, visit, row_end)


def _call(kernel, inputs, in_specs, out_shape, out_specs, *, tc: int, num_slots: int,
          block_size: int, scale: float, interpret: bool, name: str):
  """A forward / dq pallas_call over grid (B, H, Tp/tc). inputs = (step table
  [B*H*(Tp/tc)*W] (tpu_common.step_table), q [B,Tp,H,G,D], k/v blocks [B,H,NB*l',*], *more);
  in_specs: the specs of `more`."""
  table, q, k, v, *_ = inputs
  b, tp, h, g, d = q.shape
  steps = tp // tc
  width = table.shape[0] // (b * h * steps)
  in_specs = [pl.BlockSpec((width,), lambda bi, hi, ci: ((bi * h + hi) * steps + ci,),
                           memory_space=pltpu.SMEM),
              _rows(tc, g, d), pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY), *in_specs]
  return pl.pallas_call(
      functools.partial(kernel, tc=tc, num_slots=num_slots, block_size=block_size,
                        scale=scale),
      grid=(b, h, tp // tc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((2, block_size, k.shape[-1]), k.dtype),
                      pltpu.VMEM((2, block_size, v.shape[-1]), v.dtype),
                      pltpu.SemaphoreType.DMA((2, 2))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=common.interpret_params(interpret), name=name,
  )(*inputs)


def _rows(tc: int, g: int, width: int):
  """The tc queries' [G, width] tiles of a [B,Tp,H,G,width] array."""
  return pl.BlockSpec((None, tc, None, g, width), lambda bi, hi, ci: (bi, ci, hi, 0, 0))


def _lane_rows(g: int, width: int):
  """The step's [G, width] rows of a [B,H,Tp/tc,G,width] array."""
  return pl.BlockSpec((None, None, None, g, width), lambda bi, hi, ci: (bi, hi, ci, 0, 0))


def forward_tpu(q, k, v, block_indices, key_range, block_size: int, scale: float, *, tiling,
                interpret: bool):
  """q [B,T,HQ,D], k [B,T,H,D], v [B,T,H,Dv], block_indices int32 [B,T,H,S], key_range =
  (key_start, key_end) int32 [B,T] -> (o [B,T,HQ,Dv] in q's dtype, lse f32
  [B,H,Tp/tc,G,tc], the backward's residual)."""
  b, t, hq, _ = q.shape
  h, dv = k.shape[2], v.shape[-1]
  g, tc = hq // h, common.query_chunk(t, tiling)
  tp = pl.cdiv(t, tc) * tc
  inputs = (common.step_table(block_indices, *key_range, tc, tp), common.grouped(q, h, tp),
            common.kv_blocks(k, block_size), common.kv_blocks(v, block_size))
  o, lse = _call(
      _fwd_kernel, inputs, [],
      [jax.ShapeDtypeStruct((b, tp, h, g, dv), q.dtype),
       jax.ShapeDtypeStruct((b, h, tp // tc, g, tc), jnp.float32)],
      [_rows(tc, g, dv), _lane_rows(g, tc)],
      tc=tc, num_slots=block_indices.shape[-1], block_size=block_size, scale=scale,
      interpret=interpret, name="nsa_selected_fwd")
  return o[:, :t].reshape(b, t, hq, dv), lse


def backward_tpu(q, k, v, block_indices, key_range, lse, delta, do, lists, block_size: int,
                 scale: float, *, tiling, interpret: bool):
  """(dq, dk, dv) in the dtypes of (q, k, v). lse: forward_tpu's residual; delta f32
  [B,T,HQ]; do [B,T,HQ,Dv]; lists = metadata.block_query_lists(...)."""
  b, t, hq, d = q.shape
  h = k.shape[2]
  g, tc = hq // h, common.query_chunk(t, tiling)
  tp = pl.cdiv(t, tc) * tc
  stats = common.stats(lse, delta, h, tc)
  qg, dog = common.grouped(q, h, tp), common.grouped(do, h, tp)
  k_blocks, v_blocks = common.kv_blocks(k, block_size), common.kv_blocks(v, block_size)
  (dq,) = _call(
      _dq_kernel,
      (common.step_table(block_indices, *key_range, tc, tp), qg, k_blocks, v_blocks, dog,
       stats),
      [_rows(tc, g, do.shape[-1]), _lane_rows(g, 2 * tc)],
      [jax.ShapeDtypeStruct(qg.shape, q.dtype)], [_rows(tc, g, d)],
      tc=tc, num_slots=block_indices.shape[-1], block_size=block_size, scale=scale,
      interpret=interpret, name="nsa_selected_dq")
  dk, dv = tpu_dkdv.dkdv(qg, k_blocks, v_blocks, dog, stats, lists, block_size, scale,
                         tc=tc, list_chunk=tiling.list_chunk, interpret=interpret)
  return (dq[:, :t].reshape(b, t, hq, d), common.from_kv_blocks(dk, t),
          common.from_kv_blocks(dv, t))
