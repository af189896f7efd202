"""Mosaic TPU kernel for dk/dv of selected-block attention.

One grid step per (batch, kv head, key block j) walks the queries that selected j
(metadata.block_query_lists). The list (and its queries' allowed key ranges) lives in HBM and
is copied to SMEM `list_chunk` positions at a time, so SMEM use does not grow with T. For
each listed query t the kernel copies the G heads' q and dO tiles and the stats row holding
t's (lse, delta) from HBM (double buffered) and accumulates dK_j += dS^T q, dV_j += P^T dO
in f32. K_j/V_j and dK_j/dV_j are ordinary BlockSpec blocks, and each dK/dV block is written
once, by its own step: no scatter, no atomics. Layouts: tpu_common.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.nsa import tpu_common as common


def _dkdv_kernel(starts_hbm, queries_hbm, key_starts_hbm, key_ends_hbm, q_hbm, do_hbm,
                 stats_hbm, k_ref, v_ref, dk_ref, dv_ref, bounds, queries, key_starts, key_ends,
                 q_buf, do_buf, stats_buf, sems, *, tc: int, list_chunk: int, block_size: int,
                 scale: float):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pltpu.sync_copy(starts_hbm.at[b, h, pl.ds(j, 2)], bounds)
  start, end = bounds[0], bounds[1]
  # tc and list_chunk are powers of two: divisions are shifts and masks on the scalar core.
  log_tc, log_chunk = tc.bit_length() - 1, list_chunk.bit_length() - 1

  def copies(t, buffer):
    pairs = ((q_hbm.at[b, t, h], q_buf), (do_hbm.at[b, t, h], do_buf),
             (stats_hbm.at[b, h, lax.shift_right_logical(t, log_tc)], stats_buf))
    return [pltpu.make_async_copy(src, dst.at[buffer], sems.at[i, buffer])
            for i, (src, dst) in enumerate(pairs)]

  def visit(t, key_range, buffer, acc):
    q, do, stats = q_buf[buffer], do_buf[buffer], stats_buf[buffer]
    lane = jnp.bitwise_and(t, tc - 1)
    allowed = common.allowed((q.shape[0], block_size), j, block_size, *key_range)
    p, ds = common.probabilities_and_dscores(q, do, common.column(stats, lane),
                                             common.column(stats, tc + lane), k_ref[...],
                                             v_ref[...], allowed, scale)
    return (acc[0] + common.dot(ds.astype(q.dtype), q, common.TN),
            acc[1] + common.dot(p.astype(do.dtype), do, common.TN))

  def chunk(c, acc):
    base = start + c * list_chunk
    pltpu.sync_copy(queries_hbm.at[b, h, pl.ds(base, list_chunk)], queries)
    pltpu.sync_copy(key_starts_hbm.at[b, h, pl.ds(base, list_chunk)], key_starts)
    pltpu.sync_copy(key_ends_hbm.at[b, h, pl.ds(base, list_chunk)], key_ends)
    count = jnp.minimum(list_chunk, end - base)
    first = queries[0]
    for copy in copies(first, 0):
      copy.start()

    def entry(e, carry):
      t, acc = carry
      buffer = jnp.bitwise_and(e, 1)
      # Clamped so the SMEM read stays in the chunk; the last entry prefetches nothing.
      next_t = queries[jnp.minimum(e + 1, list_chunk - 1)]

      @pl.when(e + 1 < count)
      def _():
        for copy in copies(next_t, 1 - buffer):
          copy.start()

      for copy in copies(t, buffer):
        copy.wait()
      return next_t, visit(t, (key_starts[e], key_ends[e]), buffer, acc)

    return lax.fori_loop(0, count, entry, (first, acc))[1]

  # A block no query selected runs no chunk and stores zeros.
  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  num_chunks = lax.shift_right_logical(end - start + list_chunk - 1, log_chunk)
  dk, dv = lax.fori_loop(0, num_chunks, chunk, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dkdv(qg, k_blocks, v_blocks, dog, stats, lists, block_size: int, scale: float, *,
         tc: int, list_chunk: int, interpret: bool):
  """qg [B,Tp,H,G,D], k/v_blocks [B,H,NB*l',*], dog [B,Tp,H,G,Dv], stats f32
  [B,H,Tp/tc,G,2tc], lists = metadata.QueryLists -> (dk, dv) [B,H,NB*l',*] in k's / v's
  dtype."""
  queries, starts, key_starts, key_ends = lists
  b, _, h, g, d = qg.shape
  dv_dim = v_blocks.shape[-1]
  # Padding, so that the last chunk's copies stay in bounds; it is never read as a list.
  queries, key_starts, key_ends = (jnp.pad(x, ((0, 0), (0, 0), (0, list_chunk)))
                                   for x in (queries, key_starts, key_ends))

  def block(width):
    return pl.BlockSpec((None, None, block_size, width), lambda bi, hi, ji: (bi, hi, ji, 0))

  kernel = functools.partial(_dkdv_kernel, tc=tc, list_chunk=list_chunk,
                             block_size=block_size, scale=scale)
  return pl.pallas_call(
      kernel, grid=(b, h, starts.shape[-1] - 1),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 7 + [block(d), block(dv_dim)],
      out_specs=[block(d), block(dv_dim)],
      out_shape=[jax.ShapeDtypeStruct(k_blocks.shape, k_blocks.dtype),
                 jax.ShapeDtypeStruct(v_blocks.shape, v_blocks.dtype)],
      scratch_shapes=[pltpu.SMEM((2,), jnp.int32),
                      *(pltpu.SMEM((list_chunk,), jnp.int32) for _ in range(3)),
                      pltpu.VMEM((2, g, d), qg.dtype), pltpu.VMEM((2, g, dv_dim), dog.dtype),
                      pltpu.VMEM((2, g, 2 * tc), jnp.float32),
                      pltpu.SemaphoreType.DMA((3, 2))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=common.interpret_params(interpret), name="nsa_selected_dkdv",
  )(starts, queries, key_starts, key_ends, qg, dog, stats, k_blocks, v_blocks)
