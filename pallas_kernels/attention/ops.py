"""Public flash attention: `flash_attention`, differentiable (custom_vjp), on the Mosaic TPU
kernels (tpu.py). Semantics: reference.py.

Backward (flash attention 2): delta = rowsum(dO * O) in XLA, then a dq kernel (the forward's
grid) and a dk/dv kernel (key blocks outer, query blocks inner), both recomputing the
probabilities from the saved log-sum-exp, so no [T,S] array exists in either pass.

XLA cannot partition a Mosaic call: under a multi-device jit, call this inside a shard_map
(dsjax.ops.flash_attention.pallas_attention does, over the context mesh's batch and heads
axes).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import tpu
from pallas_kernels.attention.metadata import block_ranges
from pallas_kernels.attention.tiling import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Options:
  scale: float
  block_q: int
  block_k: int
  interpret: bool


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_operands(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                     "[B,T,N,Hq], [B,S,N,Hq], [B,S,N,Hv].")
  if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
    raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} differ in batch, heads or "
                     "head dim.")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} differ in batch, length "
                     "or heads.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"flash_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}; cast "
                     "them to one dtype.")
  if (q_segment_ids is None) != (k_segment_ids is None):
    raise ValueError("flash_attention: pass both q_segment_ids and k_segment_ids, or neither.")
  for name, ids, length in (("q_positions", q_positions, q.shape[1]),
                            ("k_positions", k_positions, k.shape[1]),
                            ("q_segment_ids", q_segment_ids, q.shape[1]),
                            ("k_segment_ids", k_segment_ids, k.shape[1])):
    if ids is not None and (ids.shape != (q.shape[0], length)
                            or not jnp.issubdtype(ids.dtype, jnp.integer)):
      raise ValueError(f"flash_attention: {name} {ids.shape} {ids.dtype} must be integers of "
                       f"shape [B, {length}] = {[q.shape[0], length]}.")


def _pad_to(x, length: int, axis: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _kernel_layout(x, length: int):
  """[B,L,N,H] -> [B,N,Lp,H], zero-padded along L."""
  return jnp.swapaxes(_pad_to(x, length, 1), 1, 2)


def _lane_rows(x):
  """[B,N,T] -> [B,N,T,128] lane-replicated."""
  return jnp.broadcast_to(x[..., None], (*x.shape, tpu.LANES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, info, ranges, opts: _Options):
  return _forward(q, k, v, info, ranges, opts)[0]


def _forward(q, k, v, info, ranges, opts: _Options):
  return tpu.forward(q, k, v, info, (ranges.k_start, ranges.k_end), scale=opts.scale,
                     block_q=opts.block_q, block_k=opts.block_k, interpret=opts.interpret)


def _flash_fwd(q, k, v, info, ranges, opts: _Options):
  o, lse = _forward(q, k, v, info, ranges, opts)
  return o, (q, k, v, info, ranges, o, lse[..., 0])


def _flash_bwd(opts: _Options, residuals, do):
  q, k, v, info, ranges, o, lse = residuals
  do = do.astype(q.dtype)
  # The softmax backward's row term, from the stored (rounded) output as flash attention does.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  dq, dk, dv = tpu.backward(
      q, k, v, info, (ranges.k_start, ranges.k_end), (ranges.q_start, ranges.q_end), do,
      _lane_rows(lse), _lane_rows(delta), scale=opts.scale, block_q=opts.block_q,
      block_k=opts.block_k, interpret=opts.interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                    k_positions: jax.Array, q_segment_ids: jax.Array | None = None,
                    k_segment_ids: jax.Array | None = None, *, scale: float,
                    block_sizes: BlockSizes | None = None, interpret: bool = False
                    ) -> jax.Array:
  """softmax(q.k * scale) v over the visible keys, differentiable in q, k and v.

  q [B,T,N,Hq], k [B,S,N,Hq], v [B,S,N,Hv] (one dtype; Hq and Hv may differ, e.g. MLA's 192
  and 128); key s is visible to query t iff k_positions[s] <= q_positions[t] (int [B,T] and
  [B,S]) and, with segment ids (int [B,T], [B,S]; packed sequences, 0 = padding),
  q_segment_ids[t] == k_segment_ids[s] != 0. -> o [B,T,N,Hv] in v's dtype; float32 logits
  and accumulation; a query with no visible key gives 0. `scale`: a Python number (compiled
  into the kernels). `block_sizes`: BlockSizes; `interpret`: run in Pallas' TPU interpreter
  (CPU tests).
  """
  _check_operands(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids)
  if not isinstance(scale, (int, float)):
    raise ValueError(f"flash_attention: scale must be a Python number (it is compiled into "
                     f"the kernels), got {type(scale).__name__}.")
  bs = block_sizes or BlockSizes()
  (b, t, _, _), s = q.shape, k.shape[1]
  if t == 0 or s == 0:
    return jnp.zeros((*q.shape[:3], v.shape[-1]), v.dtype)
  block_q = min(bs.block_q, _round_up(t, tpu.SUBLANES))
  block_k = min(bs.block_k, _round_up(s, tpu.LANES))
  tp, sp = _round_up(t, block_q), _round_up(s, block_k)
  if q_segment_ids is None:
    q_segment_ids, k_segment_ids = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  # Padded queries and keys get segment id 0: they see and are seen by nothing.
  qpos, qseg = (_pad_to(x.astype(jnp.int32), tp, 1) for x in (q_positions, q_segment_ids))
  kpos, kseg = (_pad_to(x.astype(jnp.int32), sp, 1) for x in (k_positions, k_segment_ids))
  ranges = block_ranges(qpos, kpos, qseg, kseg, block_q, block_k)
  info = (*(jnp.broadcast_to(x[:, :, None], (b, tp, tpu.LANES)) for x in (qpos, qseg)),
          *(jnp.broadcast_to(x[:, None, :], (b, tpu.SUBLANES, sp)) for x in (kpos, kseg)))
  opts = _Options(float(scale), block_q, block_k, interpret)
  o = _flash(_kernel_layout(q, tp), _kernel_layout(k, sp), _kernel_layout(v, sp), info, ranges,
             opts)
  return jnp.swapaxes(o, 1, 2)[:, :t]
