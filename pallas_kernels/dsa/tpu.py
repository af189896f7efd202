"""Mosaic TPU kernels for token-sparse MLA: the forward, and the TPU entry points.

A grid step (b, i) owns tq consecutive query tokens of batch row b. For each query in turn
the N heads are one [N, W] tile per plane (the matmuls' M dimension), and its index list is
walked in chunks of block_k rows gathered from HBM (tpu_gather: one DMA per selected row,
double buffered), with an online softmax in float32. Layouts (latent planes, SMEM and VMEM
index blocks): tpu_common.

Backward (tpu_backward): one kernel per chunk of queries recomputes P from the saved
log-sum-exp and writes dq and every (query, slot)'s latent-row gradient; XLA scatter-adds
those rows into dlatent.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dsa import scatter, tpu_backward
from pallas_kernels.dsa import tpu_common as common
from pallas_kernels.dsa.tpu_gather import RowGather, stream_chunks
from pallas_kernels.nsa.tpu_common import dot, interpret_params


def _fwd_kernel(idx_smem, idx_vmem, q_ref, words_hbm, o_ref, lse_ref, buf, sems, *,
                planes: common.Planes, block_k: int, scale: float, dtype):
  tq, n = q_ref.shape[0], q_ref.shape[2]
  num_chunks = idx_vmem.shape[1]
  # Rows of -1 are not copied: whatever they hold is masked, but it must be finite.
  buf[...] = jnp.zeros(buf.shape, buf.dtype)
  gather = RowGather(idx_smem, words_hbm, buf, sems, block_k, num_chunks * block_k)

  def row_start(r, lse_rows):
    accs = tuple(jnp.zeros((n, planes.value), jnp.float32) for _ in range(planes.count))
    return (jnp.full((n, 1), -jnp.inf, jnp.float32), jnp.zeros((n, 1), jnp.float32), accs,
            lse_rows)

  def visit(r, c, slot, state):
    m_prev, denom, accs, lse_rows = state
    kv = common.from_words(buf[slot], planes, dtype)
    q = [q_ref[r, i] for i in range(planes.count)]
    scores = common.logits(q, kv, scale)
    # The chunk has a copied row, so m_new is finite on every head.
    scores = jnp.where(common.chunk_valid(idx_vmem, r, c), scores, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(scores - m_new)
    accs = tuple(alpha * acc + dot(p.astype(dtype), x[:, :planes.value])
                 for acc, x in zip(accs, kv))
    return m_new, alpha * denom + jnp.sum(p, axis=1, keepdims=True), accs, lse_rows

  def row_end(r, state):
    m, denom, accs, lse_rows = state
    # A query with no valid index gives 0 and lse -inf, not NaN.
    nonempty = denom > 0
    safe = jnp.where(nonempty, denom, 1.)
    for i, acc in enumerate(accs):
      o_ref[r, i] = (acc / safe).astype(o_ref.dtype)
    lse = common.column_to_row(jnp.where(nonempty, m + jnp.log(safe), -jnp.inf))
    rows = lax.broadcasted_iota(jnp.int32, lse_rows.shape, 0)
    return jnp.where(rows == r, lse, lse_rows)

  lse_ref[...] = stream_chunks(gather, tq, num_chunks, row_start, visit, row_end,
                               jnp.zeros((tq, n), jnp.float32))


def _forward_call(idx, qp, words, planes, *, tq: int, tiling, scale: float, interpret: bool):
  """idx [B,Tp,Kp], qp [B,Tp,P,N,W], words [B,S,W] -> (o [B,Tp,P,N,Cp], lse f32 [B,Tp,N])."""
  b, tp, _, n, w = qp.shape
  steps, kp, block_k = tp // tq, idx.shape[-1], tiling.block_k
  kernel = functools.partial(_fwd_kernel, planes=planes, block_k=block_k, scale=scale,
                             dtype=qp.dtype)
  rows = common.query_rows
  return pl.pallas_call(
      kernel, grid=(b, steps),
      in_specs=[*common.index_specs(tq, steps, kp, block_k), rows(tq, planes.count, n, w),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[rows(tq, planes.count, n, planes.value), rows(tq, n)],
      out_shape=[jax.ShapeDtypeStruct((b, tp, planes.count, n, planes.value), qp.dtype),
                 jax.ShapeDtypeStruct((b, tp, n), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, block_k, w), words.dtype),
                      pltpu.SemaphoreType.DMA((2,))],
      compiler_params=common.compiler_params(tiling),
      interpret=interpret_params(interpret), name="dsa_sparse_mla_fwd",
  )(common.smem_table(idx, tq), common.vmem_table(idx, block_k), qp, words)


def _head_planes(x, planes, padded_len: int, value_only: bool = False):
  """[B,T,N,D] (or [B,T,N,C]) -> [B,Tp,P,N,W] (or [..., Cp]), queries zero-padded."""
  x = common.to_planes(x, planes, value_only)
  return common.pad_queries(jnp.swapaxes(x, 2, 3), padded_len)


def _from_head_planes(x, planes, seq_len: int, value_only: bool = False):
  return common.from_planes(jnp.swapaxes(x[:, :seq_len], 2, 3), planes, value_only)


def forward_tpu(q, latent, indices, scale: float, v_dim: int, *, tiling, interpret: bool):
  """q [B,T,N,D], latent [B,S,D] (one dtype: bf16 or f32), indices int32 [B,T,K] (< 0:
  none; < S) -> (out [B,T,N,C] in q's dtype, lse f32 [B,T,N])."""
  planes = common.planes_for(q.shape[-1], v_dim, latent.dtype)
  t = q.shape[1]
  tq = common.query_chunk(t, tiling.queries_per_step)
  tp = -(-t // tq) * tq
  o, lse = _forward_call(common.padded_indices(indices, tp, tiling.block_k),
                         _head_planes(q, planes, tp), common.to_words(latent, planes), planes,
                         tq=tq, tiling=tiling, scale=scale, interpret=interpret)
  return _from_head_planes(o, planes, t, value_only=True), lse[:, :t]


def backward_tpu(q, latent, indices, lse, delta, do, scale: float, v_dim: int, *, tiling,
                 interpret: bool):
  """(dq [B,T,N,D] in q's dtype, dlatent [B,S,D] in latent's dtype). lse, delta f32
  [B,T,N] (delta = rowsum(dO * O) - dlse); do [B,T,N,C].

  Queries go through the kernel `tiling.backward_queries` at a time: each call writes the
  per-row gradients of its queries' K slots (f32 [B,Tc,P,Kp,W]), which XLA scatter-adds into
  dlatent (memory O(Tc*K*D), not O(T*K*D))."""
  planes = common.planes_for(q.shape[-1], v_dim, latent.dtype)
  b, t, s = q.shape[0], q.shape[1], latent.shape[1]
  tq = common.query_chunk(t, tiling.queries_per_step)
  chunk, tpp = scatter.query_chunking(t, tq, tiling.backward_queries)
  idx = common.padded_indices(indices, tpp, tiling.block_k)
  qp, dop = _head_planes(q, planes, tpp), _head_planes(do, planes, tpp, value_only=True)
  lse, delta = common.pad_queries(lse, tpp), common.pad_queries(delta, tpp)
  words = common.to_words(latent, planes)

  def body(i, carry):
    dq, dlat = carry
    part = [lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
            for x in (idx, qp, dop, lse, delta)]
    dq_part, rows = tpu_backward.backward_call(*part, words, planes, tq=tq, tiling=tiling,
                                               scale=scale, interpret=interpret)
    rows = jnp.swapaxes(rows, 2, 3).reshape(b, -1, planes.count, planes.width)
    dlat = scatter.scatter_rows(dlat, rows, part[0].reshape(b, -1))
    return lax.dynamic_update_slice_in_dim(dq, dq_part, i * chunk, axis=1), dlat

  init = (jnp.zeros(qp.shape, q.dtype),
          jnp.zeros((b, s, planes.count, planes.width), jnp.float32))
  dq, dlat = lax.fori_loop(0, tpp // chunk, body, init)
  return (_from_head_planes(dq, planes, t),
          common.from_planes(dlat, planes).astype(latent.dtype))
