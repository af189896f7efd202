"""Public selected-block attention: `selected_attention`, differentiable (custom_vjp), on the
TPU (Mosaic) or GPU (Triton) kernels. Semantics: reference.py.

Backward: delta = rowsum(dO * O) in XLA, then
  dq:    a kernel with the forward's structure that recomputes P from the saved lse;
  dk/dv: a kernel per key block over the queries that selected it (metadata.py), so each
         dk/dv row is written once without scatter or atomics.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_rule
from pallas_kernels.nsa import gpu, tpu, tpu_common
from pallas_kernels.nsa.metadata import block_query_lists
from pallas_kernels.nsa.reference import default_scale
from pallas_kernels.nsa.tiling import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Options:
  block_size: int
  scale: float
  tiling: BlockSizes
  interpret: bool
  backend: str


def resolve_backend(backend: str | None, interpret: bool) -> str:
  """'tpu' or 'gpu' for selected_attention (see pallas_kernels.backend.resolve_backend)."""
  return backend_rule.resolve_backend(backend, interpret, "selected_attention",
                                      "selected_attention_gather")


def _check_operands(q, k, v, block_indices, block_size, key_start, key_end):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"selected_attention: q {q.shape}, k {k.shape}, v {v.shape} must be "
                     "[B,T,HQ,D], [B,T,H,D], [B,T,H,Dv].")
  if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"selected_attention: batch/length/heads differ: q {q.shape}, k "
                     f"{k.shape}, v {v.shape}.")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"selected_attention: q head dim {q.shape[-1]} != k head dim "
                     f"{k.shape[-1]}.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"selected_attention: {q.shape[2]} query heads are not a multiple of "
                     f"{k.shape[2]} kv heads (GQA needs HQ = H*G).")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"selected_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}; "
                     "cast them to one dtype.")
  if block_indices.shape[:3] != k.shape[:3] or block_indices.ndim != 4:
    raise ValueError(f"selected_attention: block_indices {block_indices.shape} must be "
                     f"[B,T,H,S] = {list(k.shape[:3])} + [S].")
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"selected_attention: block_indices must be integers, got "
                     f"{block_indices.dtype}.")
  for name, keys in (("key_start", key_start), ("key_end", key_end)):
    if keys is not None and (keys.shape != q.shape[:2]
                             or not jnp.issubdtype(keys.dtype, jnp.integer)):
      raise ValueError(f"selected_attention: {name} {keys.shape} {keys.dtype} must be "
                       f"integers of shape [B,T] = {list(q.shape[:2])}.")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"selected_attention: block_size={block_size!r}; use a positive int.")


def _forward(q, k, v, block_indices, key_range, opts: _Options):
  forward = tpu.forward_tpu if opts.backend == "tpu" else gpu.forward_gpu
  return forward(q, k, v, block_indices, key_range, opts.block_size, opts.scale,
                 tiling=opts.tiling, interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _selected_attention(q, k, v, block_indices, key_range, opts: _Options):
  return _forward(q, k, v, block_indices, key_range, opts)[0]


def _selected_attention_fwd(q, k, v, block_indices, key_range, opts: _Options):
  o, lse = _forward(q, k, v, block_indices, key_range, opts)
  return o, (q, k, v, block_indices, key_range, o, lse)


def _selected_attention_bwd(opts: _Options, residuals, do):
  q, k, v, block_indices, key_range, o, lse = residuals
  do = do.astype(q.dtype)
  # The softmax backward's row term, from the stored (rounded) output as flash attention does.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  num_blocks = -(-q.shape[1] // opts.block_size)
  lists = block_query_lists(block_indices, opts.block_size, num_blocks, *key_range)
  backward = tpu.backward_tpu if opts.backend == "tpu" else gpu.backward_gpu
  dq, dk, dv = backward(q, k, v, block_indices, key_range, lse, delta, do, lists,
                        opts.block_size, opts.scale, tiling=opts.tiling,
                        interpret=opts.interpret)
  return dq, dk, dv, None, None


_selected_attention.defvjp(_selected_attention_fwd, _selected_attention_bwd)


def selected_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                       block_size: int, scale: float | None = None, *,
                       key_start: jax.Array | None = None, key_end: jax.Array | None = None,
                       tiling: BlockSizes | None = None, interpret: bool = False,
                       backend: str | None = None) -> jax.Array:
  """NSA's selected-block attention, differentiable in q, k and v.

  q [B,T,HQ,D], k [B,T,H,D], v [B,T,H,Dv] (one dtype; HQ = H*G, query heads h*G .. h*G+G-1
  share kv head h), block_indices int [B,T,H,S]: the key blocks (of `block_size` tokens)
  each query's kv group attends to, -1 for none; distinct within a row apart from -1.
  Keys past the query are masked, and with `key_start` int [B,T] (packed documents: each
  query's document start, dsjax.ops.nsa.document_starts) the keys before it too. `key_end`
  int [B,T] (< T) replaces the query's position as its last allowed key, for keys that are
  not token positions (NSA's compressed blocks).
  -> o [B,T,HQ,Dv] in q's dtype; a query with no allowed key gives 0. `scale`: a Python
  float, default D**-0.5. `tiling`: BlockSizes; `interpret`: run in Pallas' interpreter (CPU
  tests); `backend`: 'tpu' | 'gpu' (default: this machine's, and 'tpu' for interpret mode on
  CPU).
  """
  _check_operands(q, k, v, block_indices, block_size, key_start, key_end)
  if scale is not None and not isinstance(scale, (int, float)):
    raise ValueError(f"selected_attention: scale must be a Python number (it is compiled "
                     f"into the kernels), got {type(scale).__name__}.")
  opts = _Options(block_size, float(default_scale(q.shape[-1]) if scale is None else scale),
                  tiling or BlockSizes(), interpret, resolve_backend(backend, interpret))
  if opts.backend == "tpu":
    tpu_common.check_block_size(block_size, q.dtype)
    tpu_common.check_list_chunk(opts.tiling.list_chunk, interpret)
  block_indices = block_indices.astype(jnp.int32)
  key_start = (jnp.zeros(q.shape[:2], jnp.int32) if key_start is None
               else key_start.astype(jnp.int32))
  key_end = (jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
             if key_end is None else key_end.astype(jnp.int32))
  if block_indices.shape[-1] == 0:  # Keeps the kernels' slot loops non-empty.
    block_indices = jnp.full((*block_indices.shape[:3], 1), -1, jnp.int32)
  if q.shape[1] == 0:
    return jnp.zeros((*q.shape[:3], v.shape[-1]), q.dtype)
  return _selected_attention(q, k, v, block_indices, (key_start, key_end), opts)
