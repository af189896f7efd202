"""Mosaic TPU kernel for dk/dv of selected-block attention.

One grid step per (batch, kv head, key block j) walks the queries that selected j
(metadata.block_query_lists). The step's list bounds arrive as an SMEM block
(tpu_common.block_bounds). The list (and its queries' allowed key ranges) lives in HBM and is
copied to SMEM in windows of `list_chunk` positions that start at multiples of list_chunk:
Mosaic copies a slice of HBM's tiled last dim only at a multiple of the 128-lane tile, so a
window starts at or before the list and entries outside it are skipped. SMEM use does not
grow with T. For
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


def _dkdv_kernel(bounds_ref, queries_hbm, key_starts_hbm, key_ends_hbm, q_hbm, do_hbm,
                 stats_hbm, k_ref, v_ref, dk_ref, dv_ref, queries, key_starts, key_ends,
                 q_buf, do_buf, stats_buf, sems, *, tc: int, list_chunk: int, block_size: int,
                 scale: float):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lane = jnp.bitwise_and(j, 127)
  start, end = bounds_ref[lane], bounds_ref[128 + lane]
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

  # The windows start at the multiple of list_chunk at or before the list's start.
  first_window = lax.shift_left(lax.shift_right_logical(start, log_chunk), log_chunk)

  def chunk(c, acc):
    base = pl.multiple_of(first_window + c * list_chunk, list_chunk)
    pltpu.sync_copy(queries_hbm.at[b, h, pl.ds(base, list_chunk)], queries)
    pltpu.sync_copy(key_starts_hbm.at[b, h, pl.ds(base, list_chunk)], key_starts)
    pltpu.sync_copy(key_ends_hbm.at[b, h, pl.ds(base, list_chunk)], key_ends)
    # The window's entries that belong to this block's list: [lo, hi).
    lo, hi = jnp.maximum(start - base, 0), jnp.minimum(list_chunk, end - base)
    first = queries[lo]
    for copy in copies(first, jnp.bitwise_and(lo, 1)):
      copy.start()

    def entry(e, carry):
      t, acc = carry
      buffer = jnp.bitwise_and(e, 1)
      # Clamped so the SMEM read stays in the window; the last entry prefetches nothing.
      next_t = queries[jnp.minimum(e + 1, list_chunk - 1)]

      @pl.when(e + 1 < hi)
      def _():
        for copy in copies(next_t, 1 - buffer):
          copy.start()

      for copy in copies(t, buffer):
        copy.wait()
      return next_t, visit(t, (key_starts[e], key_ends[e]), buffer, acc)

    return lax.fori_loop(lo, hi, entry, (first, acc))[1]

  # A block no query selected runs no chunk and stores zeros.
  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  num_chunks = jnp.where(end > start, lax.shift_right_logical(
      end - first_window + list_chunk - 1, log_chunk), 0)
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
  num_blocks = starts.shape[-1] - 1
  # Padding to whole windows, so that the last window's copies stay in bounds; it is never
  # read as a list.
  pad = pl.cdiv(queries.shape[-1], list_chunk) * list_chunk - queries.shape[-1]
  queries, key_starts, key_ends = (jnp.pad(x, ((0, 0), (0, 0), (0, pad)))
                                   for x in (queries, key_starts, key_ends))
  chunks = pl.cdiv(num_blocks, 128)
  bounds = pl.BlockSpec((256,), lambda bi, hi, ji: ((bi * h + hi) * chunks + ji // 128,),
                        memory_space=pltpu.SMEM)

  def block(width):
    return pl.BlockSpec((None, None, block_size, width), lambda bi, hi, ji: (bi, hi, ji, 0))

  kernel = functools.partial(_dkdv_kernel, tc=tc, list_chunk=list_chunk,
                             block_size=block_size, scale=scale)
  return pl.pallas_call(
      kernel, grid=(b, h, num_blocks),
      in_specs=[bounds] + [pl.BlockSpec(memory_space=pl.ANY)] * 6 + [block(d), block(dv_dim)],
      out_specs=[block(d), block(dv_dim)],
      out_shape=[jax.ShapeDtypeStruct(k_blocks.shape, k_blocks.dtype),
                 jax.ShapeDtypeStruct(v_blocks.shape, v_blocks.dtype)],
      scratch_shapes=[*(pltpu.SMEM((list_chunk,), jnp.int32) for _ in range(3)),
                      pltpu.VMEM((2, g, d), qg.dtype), pltpu.VMEM((2, g, dv_dim), dog.dtype),
                      pltpu.VMEM((2, g, 2 * tc), jnp.float32),
                      pltpu.SemaphoreType.DMA((3, 2))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=common.interpret_params(interpret), name="nsa_selected_dkdv",
  )(common.block_bounds(starts), queries, key_starts, key_ends, qg, dog, stats, k_blocks,
    v_blocks)
