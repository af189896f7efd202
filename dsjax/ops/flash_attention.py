"""Memory-efficient implementations of dsjax.ops.attention's math (docs/attention.md):

  blocked_attention  pure XLA, any backend: an online softmax over key blocks for each query
                     block, with a custom_vjp whose backward recomputes the probabilities
                     blockwise from the saved log-sum-exp (flash attention 2). Memory
                     O(B N block_q block_k) for the scores instead of O(B N T S); key blocks
                     that no query of a block can see (past the diagonal, other documents)
                     are skipped, not masked.
  pallas_attention   the Mosaic TPU kernel of pallas_kernels.attention, in a shard_map over
                     the context mesh's batch and heads axes when one is set.
  cudnn_attention    cuDNN's fused attention (jax.nn.dot_product_attention) on NVIDIA GPUs.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from dsjax.ops.attention import AttentionMask
from pallas_kernels.attention import BlockSizes, block_ranges
from pallas_kernels.attention import flash_attention as _pallas_flash_attention

# Default blocks, read at each call: the blocked path's query and key blocks ([B,N,512,512]
# float32 scores per step), and the Pallas kernel's BlockSizes.
BLOCK_Q = 512
BLOCK_K = 512
PALLAS_BLOCK_SIZES = BlockSizes(block_q=512, block_k=512)


@dataclasses.dataclass(frozen=True)
class _Options:
  scale: float
  block_q: int
  block_k: int


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_to(x, length: int):
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _visible(qpos, qseg, kpos, kseg):
  """bool [B,1,bq,bk] from the blocks' positions and segment ids ([B,bq], [B,bk])."""
  return ((kpos[:, None, :] <= qpos[:, :, None]) & (qseg[:, :, None] == kseg[:, None, :])
          & (kseg[:, None, :] != 0))[:, None]


def _block(x, index, size: int, axis: int = 1):
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _split_blocks(x, size: int):
  """[B,L,...] -> [L/size,B,size,...] (blocks leading, for lax.map / lax.scan)."""
  return jnp.swapaxes(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 0, 1)


def _join_blocks(x):
  """[L/size,B,size,...] -> [B,L,...]."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _forward(q, k, v, info, spans, opts: _Options):
  """(o [B,Tp,N,Hv] in v's dtype, lse f32 [B,N,Tp], -inf for queries without keys)."""
  qpos, qseg, kpos, kseg = info
  k_start, k_end = spans[:2]
  b, _, n, _ = q.shape
  bq, bk, hv = opts.block_q, opts.block_k, v.shape[-1]

  def query_block(xs):
    i, qi, qposi, qsegi = xs

    def step(j, carry):
      m, l, acc = carry
      s = jnp.einsum("BTNH,BSNH->BNTS", qi, _block(k, j, bk),
                     preferred_element_type=jnp.float32) * opts.scale
      s = jnp.where(_visible(qposi, qsegi, _block(kpos, j, bk), _block(kseg, j, bk)), s,
                    -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead.
      m_safe = jnp.where(m_new == -jnp.inf, 0., m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      pv = jnp.einsum("BNTS,BSNH->BNTH", p.astype(v.dtype), _block(v, j, bk),
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    init = (jnp.full((b, n, bq), -jnp.inf, jnp.float32), jnp.zeros((b, n, bq), jnp.float32),
            jnp.zeros((b, n, bq, hv), jnp.float32))
    m, l, acc = lax.fori_loop(k_start[i], k_end[i], step, init)
    nonempty = l > 0
    safe = jnp.where(nonempty, l, 1.)
    o = jnp.swapaxes((acc / safe[..., None]).astype(v.dtype), 1, 2)
    return o, jnp.where(nonempty, m + jnp.log(safe), -jnp.inf)

  nq = q.shape[1] // bq
  o, lse = lax.map(query_block, (jnp.arange(nq), _split_blocks(q, bq), _split_blocks(qpos, bq),
                                 _split_blocks(qseg, bq)))
  return _join_blocks(o), jnp.moveaxis(lse, 0, 2).reshape(b, n, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(q, k, v, info, spans, opts: _Options):
  return _forward(q, k, v, info, spans, opts)[0]


def _blocked_fwd(q, k, v, info, spans, opts: _Options):
  o, lse = _forward(q, k, v, info, spans, opts)
  return o, (q, k, v, info, spans, o, lse)


def _blocked_bwd(opts: _Options, residuals, do):
  """Key blocks outer (each one's dk, dv accumulate locally), the query blocks that see it
  inner; dq accumulates in a float32 carry."""
  q, k, v, (qpos, qseg, kpos, kseg), spans, o, lse = residuals
  q_start, q_end = spans[2:]
  bq, bk, scale = opts.block_q, opts.block_k, opts.scale
  do = do.astype(q.dtype)
  # The softmax backward's row term, from the stored (rounded) output as flash attention does.
  delta = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
  f32 = jnp.float32

  def key_block(dq, xs):
    j, kj, vj, kposj, ksegj = xs

    def step(i, carry):
      dq, dk, dv = carry
      qi, doi = _block(q, i, bq), _block(do, i, bq)
      s = jnp.einsum("BTNH,BSNH->BNTS", qi, kj, preferred_element_type=f32) * scale
      # Hidden entries (and rows without keys, whose lse is -inf) give exactly 0.
      p = jnp.where(_visible(_block(qpos, i, bq), _block(qseg, i, bq), kposj, ksegj),
                    jnp.exp(s - _block(lse, i, bq, axis=2)[..., None]), 0.)
      dv = dv + jnp.einsum("BNTS,BTNH->BSNH", p.astype(do.dtype), doi,
                           preferred_element_type=f32)
      dp = jnp.einsum("BTNH,BSNH->BNTS", doi, vj, preferred_element_type=f32)
      ds = p * (dp - _block(delta, i, bq, axis=2)[..., None])
      dk = dk + jnp.einsum("BNTS,BTNH->BSNH", ds.astype(q.dtype), qi,
                           preferred_element_type=f32)
      dq_i = jnp.einsum("BNTS,BSNH->BTNH", ds.astype(k.dtype), kj, preferred_element_type=f32)
      return lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bq) + dq_i, i * bq, axis=1), dk, dv

    init = (dq, jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
    dq, dk, dv = lax.fori_loop(q_start[j], q_end[j], step, init)
    return dq, (dk, dv)

  nk = k.shape[1] // bk
  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q.shape, f32),
                          (jnp.arange(nk), *(_split_blocks(x, bk) for x in (k, v, kpos, kseg))))
  return ((dq * scale).astype(q.dtype), (_join_blocks(dk) * scale).astype(k.dtype),
          _join_blocks(dv).astype(v.dtype), None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _batch_span(start, end, empty: int):
  """The union over batch rows of per-row block ranges [B, n] -> ([n], [n]); (empty, 0) where
  no row has a block."""
  start = jnp.min(jnp.where(end > start, start, empty), axis=0)
  return start, jnp.max(end, axis=0)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                      scale: float, block_q: int | None = None, block_k: int | None = None
                      ) -> jax.Array:
  """dsjax.ops.attention's math in key blocks of block_k for query blocks of block_q (default
  BLOCK_Q, BLOCK_K; both cut to the sequence when it is shorter; lengths padded to whole
  blocks): q [B,T,N,Hq], k [B,S,N,Hq], v [B,S,N,Hv] -> [B,T,N,Hv] in v's dtype.
  Differentiable (custom_vjp)."""
  (b, t, _, _), s = q.shape, k.shape[1]
  if t == 0 or s == 0:
    return jnp.zeros((*q.shape[:3], v.shape[-1]), v.dtype)
  bq, bk = min(block_q or BLOCK_Q, t), min(block_k or BLOCK_K, s)
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  q_seg, k_seg = mask.q_segment_ids, mask.k_segment_ids
  if q_seg is None:
    q_seg, k_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  # Padded queries and keys get segment id 0: they see and are seen by nothing.
  qpos, qseg = (_pad_to(x.astype(jnp.int32), tp) for x in (mask.q_positions, q_seg))
  kpos, kseg = (_pad_to(x.astype(jnp.int32), sp) for x in (mask.k_positions, k_seg))
  ranges = block_ranges(qpos, kpos, qseg, kseg, bq, bk)
  spans = (*_batch_span(ranges.k_start, ranges.k_end, sp // bk),
           *_batch_span(ranges.q_start, ranges.q_end, tp // bq))
  o = _blocked(_pad_to(q, tp), _pad_to(k, sp), _pad_to(v, sp), (qpos, qseg, kpos, kseg), spans,
               _Options(float(scale), bq, bk))
  return o[:, :t]


def context_mesh():
  """The mesh set by jax.set_mesh around this trace, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def kernel_placeable() -> bool:
  """Whether a Mosaic kernel traced now can be placed: XLA cannot partition one, so it needs
  a context mesh (pallas_attention then runs it in a shard_map) or a single-device TPU
  process."""
  return (context_mesh() is not None
          or (jax.default_backend() == "tpu" and jax.device_count() == 1))


def _kernel_axes(mesh, batch: int, heads: int):
  """The context mesh's axes for the kernel's batch and heads dims: dsjax's batch axes and
  the `heads` rule's axis (dsjax.parallel), where the mesh has them and they divide the dim;
  None (whole on every device) otherwise."""
  from dsjax.parallel.mesh import BATCH_AXES
  from dsjax.parallel.rules import DEFAULT_RULES
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
  batch_axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  heads_axis = dict(DEFAULT_RULES)["heads"]
  return (batch_axes if batch_axes and batch % size(batch_axes) == 0 else None,
          heads_axis if mesh.shape.get(heads_axis, 1) > 1 and heads % size((heads_axis,)) == 0
          else None)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                     scale: float, interpret: bool = False,
                     block_sizes: BlockSizes | None = None) -> jax.Array:
  """The Pallas TPU flash attention kernel (pallas_kernels.attention) with `block_sizes`
  (default PALLAS_BLOCK_SIZES); `interpret` runs it in Pallas' TPU interpreter (CPU tests).
  Under a context mesh (jax.set_mesh) it runs in a shard_map, each device on its batch rows
  and heads (_kernel_axes), lengths and head dims whole: no collective when the operands
  come sharded that way, which dsjax's default rules do."""
  def kernel(q, k, v, *ids):
    return _pallas_flash_attention(q, k, v, *ids, scale=float(scale), interpret=interpret,
                                   block_sizes=block_sizes or PALLAS_BLOCK_SIZES)
  ids = [x for x in mask if x is not None]
  mesh = context_mesh()
  if mesh is None:
    return kernel(q, k, v, *ids)
  batch, heads = _kernel_axes(mesh, q.shape[0], q.shape[2])
  tokens, rows = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(tokens,) * 3 + (rows,) * len(ids),
                       out_specs=tokens, check_vma=False)(q, k, v, *ids)


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether cudnn_attention runs these operands here (the conditions of JAX's cuDNN entry,
  jax/_src/cudnn/fused_attention_stablehlo.py): a CUDA GPU backend with cuDNN; bf16/fp16
  operands; a q/k head dim that is a multiple of 8, <= 128, or <= 256 on Hopper and later;
  a v head dim no larger (v is padded to it); even T and S (cuDNN's rule for a bias in
  training; the mask goes in as one). cuDNN's checks ask the local GPU, so compiling for a
  compile-only H100 from a CPU host never qualifies."""
  if jax.default_backend() != "gpu" or jnp.dtype(q.dtype) not in map(jnp.dtype, _CUDNN_DTYPES):
    return False
  hq, hv = q.shape[-1], v.shape[-1]
  if hq % 8 or hv > hq or q.shape[1] % 2 or k.shape[1] % 2:
    return False
  try:
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    check_cudnn_version()
    capability = tuple(int(x) for x in jax.devices()[0].compute_capability.split("."))
  except Exception:  # no cuDNN library, a non-CUDA GPU, or a JAX without this module
    return False
  return hq <= (256 if capability >= (9, 0) else 128)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                    scale: float) -> jax.Array:
  """cuDNN's fused flash attention (jax.nn.dot_product_attention, implementation="cudnn").
  Its public entry takes one head dim for k and v, so v is zero-padded to Hq and the extra
  output columns dropped. Visibility goes in as the dense mask [B,1,T,S] (cuDNN turns it into
  a bias; O(B T S), no heads factor): cuDNN's own causal and packed masks count token indices,
  not positions. A query with no visible key would get cuDNN's uniform average; it is zeroed."""
  hq, hv = q.shape[-1], v.shape[-1]
  dense = mask.dense()
  v = jnp.pad(v, [(0, 0)] * 3 + [(0, hq - hv)])
  o = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=float(scale),
                                   implementation="cudnn")[..., :hv]
  any_key = jnp.any(dense[:, 0], axis=-1)[:, :, None, None]
  return jnp.where(any_key, o, 0).astype(v.dtype)
