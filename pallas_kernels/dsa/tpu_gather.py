"""The TPU kernels' gather: each query's index list, in chunks of block_k rows, copied from
HBM to VMEM with one async DMA per selected row, double buffered across chunks and queries.

A row DMA is issued for each index >= 0 (read from the step's SMEM block) into row i of the
chunk's buffer; -1 rows are not copied (their buffer rows keep an earlier chunk's finite
data, or the zeros of the step's start, and the kernels mask them). All row copies of a buffer
signal its one semaphore; the consumer waits once per copied row (DMA semaphores count bytes
and every row copy is the same size), so only the number of copies, not their rows, is
remembered.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


class RowGather:
  """Row copies of words_hbm [B,S,W] into buf [2, block_k, W] (one buffer per parity of the
  item), for grid step (b, ·) whose SMEM block idx_smem holds tq * Kp indices."""

  def __init__(self, idx_smem, words_hbm, buf, sems, block_k: int, padded_k: int):
    self.idx_smem, self.words_hbm, self.buf, self.sems = idx_smem, words_hbm, buf, sems
    self.block_k, self.padded_k = block_k, padded_k
    self.b = pl.program_id(0)

  def _row_copy(self, row, slot, i):
    return pltpu.make_async_copy(self.words_hbm.at[self.b, pl.ds(row, 1)],
                                 self.buf.at[slot, pl.ds(i, 1)], self.sems.at[slot])

  def start(self, r, c, slot):
    """Starts the copies of query r's chunk c into buffer `slot`; -> how many (int32)."""
    base = r * self.padded_k + c * self.block_k

    def one(i, count):
      row = self.idx_smem[base + i]

      @pl.when(row >= 0)
      def _():
        self._row_copy(row, slot, i).start()
      return count + (row >= 0).astype(jnp.int32)
    # Unrolled: the scalar core issues the copies; block_k is a multiple of 8.
    return lax.fori_loop(0, self.block_k, one, jnp.int32(0), unroll=8)

  def wait(self, slot, count):
    """Waits for `count` row copies into buffer `slot`."""
    copy = self._row_copy(0, slot, 0)

    def one(_, carry):
      copy.wait()
      return carry
    lax.fori_loop(0, count, one, jnp.int32(0))


def stream_chunks(gather: RowGather, rows: int, num_chunks: int, row_start, visit, row_end,
                  carry):
  """Walks the step's items (query r, chunk c), r < rows, c < num_chunks, in order:
    state = row_start(r, carry)
    state = visit(r, c, slot, state)    for each chunk with a copied row (in buffer `slot`)
    carry = row_end(r, state)
  and returns the last carry. The next item's copies start before the current item's wait,
  so one chunk is in flight behind each visit; every started copy is waited on within the
  step. A chunk of -1s copies nothing and is not visited."""
  def row(r, outer):
    count, carry = outer

    def chunk(c, inner):
      count, state = inner
      slot = jnp.bitwise_and(r * num_chunks + c, 1)
      last = c + 1 == num_chunks
      next_r, next_c = jnp.where(last, r + 1, r), jnp.where(last, 0, c + 1)
      next_count = lax.cond(next_r < rows, lambda: gather.start(next_r, next_c, 1 - slot),
                            lambda: jnp.int32(0))
      gather.wait(slot, count)
      state = lax.cond(count > 0, lambda s: visit(r, c, slot, s), lambda s: s, state)
      return next_count, state

    count, state = lax.fori_loop(0, num_chunks, chunk, (count, row_start(r, carry)))
    return count, row_end(r, state)

  first = gather.start(0, 0, 0)
  return lax.fori_loop(0, rows, row, (first, carry))[1]
