"""Mosaic TPU backward kernel of token-sparse MLA: dq and the per-(query, slot) latent rows.

The forward's walk (tpu.py): grid step (b, i) owns tq queries, each query's index list is
gathered chunk by chunk. Per chunk, with the N heads as one tile,
  P  = exp(scale q k^T - lse)            (recomputed from the saved log-sum-exp)
  dS = P * (dO v^T - delta)              (delta = rowsum(dO * O) - dlse, from XLA)
  dq += dS k;   row gradients g = scale dS^T q  (+ P^T dO on the value channels)
dq stays in VMEM per query; g ([block_k, W] per plane, f32) goes back to HBM with async
DMAs from a double buffer, [B,Tc,P,Kp,W]. XLA then scatter-adds the rows into dlatent
(scatter.py): O(Tc*K*D) memory for the rows of one call's Tc queries. Chunks of -1s are not
visited, so their rows are left unwritten; the scatter drops them.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dsa import tpu_common as common
from pallas_kernels.dsa.tpu_gather import RowGather, stream_chunks
from pallas_kernels.nsa.tpu_common import NT, TN, dot, interpret_params


def _bwd_kernel(idx_smem, idx_vmem, q_ref, do_ref, lse_ref, delta_ref, words_hbm, dq_ref,
                rows_hbm, buf, rows_buf, sems, out_sems, *, planes: common.Planes,
                block_k: int, scale: float, dtype):
  tq, n = q_ref.shape[0], q_ref.shape[2]
  num_chunks = idx_vmem.shape[1]
  b, first_query = pl.program_id(0), pl.program_id(1) * tq
  buf[...] = jnp.zeros(buf.shape, buf.dtype)
  gather = RowGather(idx_smem, words_hbm, buf, sems, block_k, num_chunks * block_k)
  lse_block, delta_block = lse_ref[...], delta_ref[...]

  def out_copies(r, c, slot):
    return [pltpu.make_async_copy(
        rows_buf.at[slot, i], rows_hbm.at[b, first_query + r, i, pl.ds(c * block_k, block_k)],
        out_sems.at[slot]) for i in range(planes.count)]

  def wait_out(slot, pending):
    """Waits for buffer `slot`'s copy to HBM if one is in flight (bit `slot` of pending)."""
    @pl.when(jnp.bitwise_and(lax.shift_right_logical(pending, slot), 1) == 1)
    def _():
      for copy in out_copies(0, 0, slot):
        copy.wait()

  def row_start(r, pending):
    stats = (common.row_to_column(common.select_row(x, r)) for x in (lse_block, delta_block))
    dqs = tuple(jnp.zeros((n, planes.width), jnp.float32) for _ in range(planes.count))
    return dqs, *stats, pending

  def visit(r, c, slot, state):
    dqs, lse, delta, pending = state
    kv = common.from_words(buf[slot], planes, dtype)
    q = [q_ref[r, p] for p in range(planes.count)]
    do = [do_ref[r, p] for p in range(planes.count)]
    valid = common.chunk_valid(idx_vmem, r, c)
    p = jnp.where(valid, jnp.exp(common.logits(q, kv, scale) - lse), 0.)
    dp = sum(dot(g, x[:, :planes.value], NT) for g, x in zip(do, kv))
    ds = (p * (dp - delta)).astype(dtype)
    dqs = tuple(acc + dot(ds, x) for acc, x in zip(dqs, kv))
    wait_out(slot, pending)
    for i in range(planes.count):
      rows_buf[slot, i] = dot(ds, q[i], TN) * scale
      rows_buf[slot, i, :, :planes.value] += dot(p.astype(dtype), do[i], TN)
    for copy in out_copies(r, c, slot):
      copy.start()
    return dqs, lse, delta, jnp.bitwise_or(pending, lax.shift_left(jnp.int32(1), slot))

  def row_end(r, state):
    dqs, _, _, pending = state
    for i, acc in enumerate(dqs):
      dq_ref[r, i] = (acc * scale).astype(dq_ref.dtype)
    return pending

  pending = stream_chunks(gather, tq, num_chunks, row_start, visit, row_end, jnp.int32(0))
  for slot in range(2):
    wait_out(slot, pending)


def backward_call(idx, qp, dop, lse, delta, words, planes: common.Planes, *, tq: int, tiling,
                  scale: float, interpret: bool):
  """idx [B,Tc,Kp], qp [B,Tc,P,N,W], dop [B,Tc,P,N,Cp], lse / delta f32 [B,Tc,N], words
  [B,S,W] -> (dq [B,Tc,P,N,W] in q's dtype, rows f32 [B,Tc,P,Kp,W])."""
  b, tc, _, n, w = qp.shape
  steps, kp, block_k = tc // tq, idx.shape[-1], tiling.block_k
  kernel = functools.partial(_bwd_kernel, planes=planes, block_k=block_k, scale=scale,
                             dtype=qp.dtype)
  rows, hbm = common.query_rows, pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      kernel, grid=(b, steps),
      in_specs=[*common.index_specs(tq, steps, kp, block_k), rows(tq, planes.count, n, w),
                rows(tq, planes.count, n, planes.value), rows(tq, n), rows(tq, n), hbm],
      out_specs=[rows(tq, planes.count, n, w), hbm],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, qp.dtype),
                 jax.ShapeDtypeStruct((b, tc, planes.count, kp, w), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, block_k, w), words.dtype),
                      pltpu.VMEM((2, planes.count, block_k, w), jnp.float32),
                      pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=common.compiler_params(tiling),
      interpret=interpret_params(interpret), name="dsa_sparse_mla_bwd",
  )(common.smem_table(idx, tq), common.vmem_table(idx, block_k), qp, dop, lse, delta, words)
