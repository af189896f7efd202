"""Mosaic TPU kernels of flash attention: forward (o, lse), dq, and dk/dv.

Layouts (ops.py makes them): q [B,N,Tp,Hq], k [B,N,Sp,Hq], v [B,N,Sp,Hv], blocks covering
the whole head dim (so Hq=192 and Hv=128 need no padding: a block dim equal to the array dim
satisfies Mosaic's (8, 128) rule). Visibility comes from positions and segment ids, not a
dense mask: the query side lane-replicated [B,Tp,128] (a block is a [bq,128] column tile),
the key side sublane-replicated [B,8,Sp] (a block's first row is the [1,bk] key row), as in
jax's own flash attention; the kernel builds each [bq,bk] mask from them.

Skipping: the scalar-prefetched BlockRanges (metadata.py) say which key blocks a query block
may see (and the reverse for dk/dv). A step outside the range computes nothing, and its
index map repeats the nearest block in the range, so the pipeline issues no copy for it.

Row statistics (running max, denominator, lse, delta) are [bq,128] lane-replicated tiles.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a [m,k] x [n,k] -> [m,n] contraction


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _lanes(x, width: int):
  """A lane-replicated [rows,128] statistic widened (or cut) to [rows,width]."""
  if width <= LANES:
    return x[:, :width]
  reps = -(-width // LANES)
  x = jnp.tile(x, (1, reps))
  return x if reps * LANES == width else x[:, :width]


def _visible(qpos_ref, qseg_ref, kpos_ref, kseg_ref):
  """bool [bq,bk]: k_pos <= q_pos, same segment, key not padding."""
  bk = kpos_ref.shape[-1]
  qpos, qseg = _lanes(qpos_ref[...], bk), _lanes(qseg_ref[...], bk)
  kpos, kseg = kpos_ref[:1, :], kseg_ref[:1, :]
  return (kpos <= qpos) & (qseg == kseg) & (kseg != 0)


def _scores(q_ref, k_ref, scale: float):
  return lax.dot_general(q_ref[...], k_ref[...], _NT,
                         preferred_element_type=jnp.float32) * scale


def _clamp(step, start, end):
  """The block a step outside [start, end) fetches: the nearest one inside (block 0 when the
  range is empty), so that skipped steps repeat a block index and copy nothing."""
  return jnp.minimum(jnp.maximum(step, start), jnp.maximum(end - 1, start))


# ---- forward ----

def _fwd_kernel(k_start_ref, k_end_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref,
                kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale: float,
                num_q_blocks: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * num_q_blocks + i
  bk, hv = k_ref.shape[0], v_ref.shape[-1]

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= k_start_ref[row]) & (j < k_end_ref[row]))
  def _():
    s = jnp.where(_visible(qpos_ref, qseg_ref, kpos_ref, kseg_ref),
                  _scores(q_ref, k_ref, scale), -jnp.inf)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead.
    m_safe = jnp.where(m_new == -jnp.inf, 0., m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - _lanes(m_safe, bk))
    m_scr[...] = m_new
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = _lanes(alpha, hv) * acc_scr[...] + lax.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_scr[...]
    nonempty = l > 0
    safe = jnp.where(nonempty, l, 1.)
    o_ref[...] = (acc_scr[...] / _lanes(safe, hv)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m_scr[...] + jnp.log(safe), -jnp.inf)


def _specs(bq: int, bk: int, hq: int, hv: int, q_block, k_block):
  """BlockSpecs of q, k, v, qpos, qseg, kpos, kseg, and the [bq, *] row specs (for o, do,
  lse, delta), for a grid whose steps read query block q_block(*grid, *prefetch) and key
  block k_block(*grid, *prefetch)."""
  def q_map(layout):
    return lambda *a: layout(a[0], a[1], q_block(*a))

  def k_map(layout):
    return lambda *a: layout(a[0], a[1], k_block(*a))
  heads = lambda b, h, x: (b, h, x, 0)  # noqa: E731
  q_rows = lambda width: pl.BlockSpec((None, None, bq, width), q_map(heads))  # noqa: E731
  info_q = pl.BlockSpec((None, bq, LANES), q_map(lambda b, h, x: (b, x, 0)))
  info_k = pl.BlockSpec((None, SUBLANES, bk), k_map(lambda b, h, x: (b, 0, x)))
  operands = [q_rows(hq), pl.BlockSpec((None, None, bk, hq), k_map(heads)),
              pl.BlockSpec((None, None, bk, hv), k_map(heads)), info_q, info_q, info_k, info_k]
  return operands, q_rows


def _call(kernel, prefetch, inputs, in_specs, out_specs, out_shape, scratch, grid, name,
          interpret):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret), name=name,
  )(*prefetch, *inputs)


def forward(q, k, v, info, k_range, *, scale: float, block_q: int, block_k: int,
            interpret: bool):
  """(o [B,N,Tp,Hv] in v's dtype, lse f32 [B,N,Tp,128] lane-replicated). info = (qpos, qseg
  [B,Tp,128], kpos, kseg [B,8,Sp]); k_range = (k_start, k_end) int32 [B,Tp/block_q], the key
  blocks each query block may see (metadata.BlockRanges)."""
  b, n, tp, hq = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  nq, nk = tp // block_q, sp // block_k
  k_block = lambda b_, h, i, j, ks, ke: _clamp(j, ks[b_ * nq + i], ke[b_ * nq + i])  # noqa
  q_block = lambda b_, h, i, j, ks, ke: i  # noqa: E731
  in_specs, rows = _specs(block_q, block_k, hq, hv, q_block, k_block)
  kernel = functools.partial(_fwd_kernel, scale=scale, num_q_blocks=nq)
  return _call(
      kernel, tuple(x.reshape(-1) for x in k_range), (q, k, v, *info),
      in_specs, [rows(hv), rows(LANES)],
      [jax.ShapeDtypeStruct((b, n, tp, hv), v.dtype),
       jax.ShapeDtypeStruct((b, n, tp, LANES), jnp.float32)],
      [pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
       pltpu.VMEM((block_q, hv), jnp.float32)],
      (b, n, nq, nk), "flash_attention_fwd", interpret)


# ---- backward ----

def _probabilities_and_dscores(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, info_refs,
                               scale: float):
  """p = softmax probabilities recomputed from the saved lse, ds = p * (dO.V^T - delta);
  both f32 [bq,bk], zero where hidden."""
  bk = k_ref.shape[0]
  s = _scores(q_ref, k_ref, scale)
  # Hidden entries (and rows without keys, whose lse is -inf) give exactly 0.
  p = jnp.where(_visible(*info_refs), jnp.exp(s - _lanes(lse_ref[...], bk)), 0.)
  dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
  return p, p * (dp - _lanes(delta_ref[...], bk))


def _dq_kernel(k_start_ref, k_end_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref,
               kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, scale: float,
               num_q_blocks: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * num_q_blocks + i

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= k_start_ref[row]) & (j < k_end_ref[row]))
  def _():
    _, ds = _probabilities_and_dscores(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                       (qpos_ref, qseg_ref, kpos_ref, kseg_ref), scale)
    k = k_ref[...]
    dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_start_ref, q_end_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref,
                kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *,
                scale: float, num_k_blocks: int):
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  col = b * num_k_blocks + j

  @pl.when(i == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= q_start_ref[col]) & (i < q_end_ref[col]))
  def _():
    p, ds = _probabilities_and_dscores(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                       (qpos_ref, qseg_ref, kpos_ref, kseg_ref), scale)
    q, do = q_ref[...], do_ref[...]
    dv_scr[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_scr[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, info, k_range, q_range, do, lse, delta, *, scale: float, block_q: int,
             block_k: int, interpret: bool):
  """(dq, dk, dv) in the operands' layouts and dtypes. do [B,N,Tp,Hv] in q's dtype; lse and
  delta f32 [B,N,Tp,128] lane-replicated; q_range = (q_start, q_end) int32 [B,Sp/block_k],
  the query blocks that may see each key block."""
  b, n, tp, hq = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  nq, nk = tp // block_q, sp // block_k
  inputs = (q, k, v, *info, do, lse, delta)

  # dq: the forward's grid, key blocks innermost.
  k_block = lambda b_, h, i, j, ks, ke: _clamp(j, ks[b_ * nq + i], ke[b_ * nq + i])  # noqa
  specs, rows = _specs(block_q, block_k, hq, hv, lambda b_, h, i, j, ks, ke: i, k_block)
  dq = _call(
      functools.partial(_dq_kernel, scale=scale, num_q_blocks=nq),
      tuple(x.reshape(-1) for x in k_range), inputs,
      specs + [rows(hv), rows(LANES), rows(LANES)], rows(hq),
      jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((block_q, hq), jnp.float32)],
      (b, n, nq, nk), "flash_attention_dq", interpret)

  # dk/dv: grid (b, h, key block j, query block i), query blocks innermost.
  q_block = lambda b_, h, j, i, qs, qe: _clamp(i, qs[b_ * nk + j], qe[b_ * nk + j])  # noqa
  specs, rows = _specs(block_q, block_k, hq, hv, q_block, lambda b_, h, j, i, qs, qe: j)
  kv_rows = lambda width: pl.BlockSpec(  # noqa: E731
      (None, None, block_k, width), lambda b_, h, j, i, qs, qe: (b_, h, j, 0))
  dk, dv = _call(
      functools.partial(_dkv_kernel, scale=scale, num_k_blocks=nk),
      tuple(x.reshape(-1) for x in q_range), inputs,
      specs + [rows(hv), rows(LANES), rows(LANES)], [kv_rows(hq), kv_rows(hv)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((block_k, hq), jnp.float32), pltpu.VMEM((block_k, hv), jnp.float32)],
      (b, n, nk, nq), "flash_attention_dkv", interpret)
  return dq, dk, dv
