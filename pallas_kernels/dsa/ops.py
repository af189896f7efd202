"""Public token-sparse MLA: `sparse_mla`, differentiable in q and the latent (custom_vjp), on the
TPU (Mosaic) or GPU (Triton) kernels. Semantics: reference.py.

Backward: delta = rowsum(dO * O) - dlse in XLA, then per chunk of queries a kernel (TPU: one,
GPU: a dq kernel and a row kernel) that recomputes P from the saved log-sum-exp and writes
dq and each (query, slot)'s latent-row gradient (the key role on all D channels plus the value
role on the first C); XLA scatter-adds the rows into dlatent [B,S,D] (scatter.py). Memory:
O(Tc*K*D) for the rows of Tc = BlockSizes.backward_queries queries at a time.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_rule
from pallas_kernels.dsa import gpu, tpu
from pallas_kernels.dsa.tiling import BlockSizes

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class _Options:
  scale: float
  v_dim: int
  tiling: BlockSizes
  interpret: bool
  backend: str


def resolve_backend(backend: str | None, interpret: bool) -> str:
  """'tpu' or 'gpu' for sparse_mla (see pallas_kernels.backend.resolve_backend)."""
  return backend_rule.resolve_backend(backend, interpret, "sparse_mla", "sparse_mla_gather")


def _check_operands(q, latent, indices, scale, v_dim):
  if q.ndim != 4 or latent.ndim != 3 or indices.ndim != 3:
    raise ValueError(f"sparse_mla: q {q.shape}, latent {latent.shape}, indices "
                     f"{indices.shape} must be [B,T,N,D], [B,S,D], [B,T,K].")
  (b, t, _, d), (bl, s, dl) = q.shape, latent.shape
  if b != bl or d != dl:
    raise ValueError(f"sparse_mla: q {q.shape} and latent {latent.shape} differ in batch "
                     "or channels (q is [B,T,N,D], latent [B,S,D]).")
  if indices.shape[:2] != (b, t):
    raise ValueError(f"sparse_mla: indices {indices.shape} must be [B,T,K] with [B,T] = "
                     f"{[b, t]} (q's).")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"sparse_mla: indices must be integers, got {indices.dtype}.")
  if q.dtype != latent.dtype or jnp.dtype(q.dtype) not in DTYPES:
    raise ValueError(f"sparse_mla: q and latent are {q.dtype} and {latent.dtype}; cast "
                     "both to bfloat16 or both to float32.")
  if not isinstance(v_dim, int) or not 0 < v_dim <= d:
    raise ValueError(f"sparse_mla: v_dim={v_dim!r}; use an int in [1, D={d}] (the value "
                     "channels are the latent's first v_dim).")
  if not isinstance(scale, (int, float)):
    raise ValueError(f"sparse_mla: scale must be a Python number (it is compiled into the "
                     f"kernels), got {type(scale).__name__}.")
  if s == 0:
    raise ValueError("sparse_mla: latent has no rows (S = 0).")


def _forward(q, latent, indices, opts: _Options):
  forward = tpu.forward_tpu if opts.backend == "tpu" else gpu.forward_gpu
  return forward(q, latent, indices, opts.scale, opts.v_dim, tiling=opts.tiling,
                 interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sparse_mla(q, latent, indices, opts: _Options):
  return _forward(q, latent, indices, opts)


def _sparse_mla_fwd(q, latent, indices, opts: _Options):
  o, lse = _forward(q, latent, indices, opts)
  return (o, lse), (q, latent, indices, o, lse)


def _sparse_mla_bwd(opts: _Options, residuals, cotangents):
  q, latent, indices, o, lse = residuals
  do, dlse = cotangents
  do = do.astype(q.dtype)
  # The softmax backward's row term, from the stored (rounded) output as flash attention
  # does; a cotangent of lse adds dlse * P to dS, i.e. subtracts dlse from delta.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - dlse
  backward = tpu.backward_tpu if opts.backend == "tpu" else gpu.backward_gpu
  dq, dlatent = backward(q, latent, indices, lse, delta, do, opts.scale, opts.v_dim,
                         tiling=opts.tiling, interpret=opts.interpret)
  return dq, dlatent, None


_sparse_mla.defvjp(_sparse_mla_fwd, _sparse_mla_bwd)


def sparse_mla(q: jax.Array, latent: jax.Array, indices: jax.Array, scale: float, v_dim: int,
               *, backend: str | None = None, interpret: bool = False,
               block_sizes: BlockSizes | None = None, return_lse: bool = False):
  """DeepSeek-V3.2's sparse attention over a shared latent (FlashMLA's sparse prefill),
  differentiable in q and latent.

  q [B,T,N,D] (D = C + R), latent [B,S,D] (the normalised c_kv next to the rotated k_pe),
  one dtype, bfloat16 or float32; indices int [B,T,K] into S (same batch row), any index
  outside [0, S) (-1 by convention) selects nothing. `scale` a Python float; `v_dim` = C,
  the value channels (the latent's first C).
  -> out [B,T,N,C] in q's dtype (and lse f32 [B,T,N] with return_lse, differentiable too).
  A query with no valid index gives 0 (lse -inf). A repeated index counts twice (see
  reference.py). `block_sizes`: BlockSizes; `interpret`: Pallas' interpreter (CPU tests);
  `backend`: 'tpu' | 'gpu' (default: this machine's, 'tpu' for interpret mode on CPU).
  """
  _check_operands(q, latent, indices, scale, v_dim)
  opts = _Options(float(scale), v_dim, block_sizes or BlockSizes(), interpret,
                  resolve_backend(backend, interpret))
  b, t, n, _ = q.shape
  num_keys = latent.shape[1]
  indices = indices.astype(jnp.int32)
  indices = jnp.where((indices >= 0) & (indices < num_keys), indices, -1)
  if indices.shape[-1] == 0:  # Keeps the kernels' chunk loops non-empty.
    indices = jnp.full((b, t, 1), -1, jnp.int32)
  if t == 0:
    out = jnp.zeros((b, 0, n, v_dim), q.dtype), jnp.zeros((b, 0, n), jnp.float32)
  else:
    out = _sparse_mla(q, latent, indices, opts)
  return out if return_lse else out[0]
