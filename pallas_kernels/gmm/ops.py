"""Public grouped matmuls: `gmm` (differentiable) and `tgmm`, dispatched to the TPU (Mosaic)
or GPU (Triton) kernel.

Rows of lhs are sorted by group: group g owns the next group_sizes[g] rows. With expert
parallelism a shard holds the contiguous groups group_offset .. group_offset + G_local - 1;
rows of other groups (and rows past sum(group_sizes)) give zeros in gmm and nothing in tgmm.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_rule
from pallas_kernels.gmm import gpu, tpu
from pallas_kernels.gmm.metadata import local_row_bounds, make_group_metadata
from pallas_kernels.gmm.tiling import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Options:
  out_dtype: jnp.dtype
  transpose_rhs: bool
  tiling: BlockSizes | None
  interpret: bool
  backend: str


def resolve_backend(backend: str | None, interpret: bool) -> str:
  """'tpu' or 'gpu' for gmm (see pallas_kernels.backend.resolve_backend)."""
  return backend_rule.resolve_backend(backend, interpret, "gmm", "jax.lax.ragged_dot")


def _check_operands(lhs, rhs, group_sizes, contract_lhs: int, contract_rhs: int, name: str):
  if lhs.ndim != 2 or rhs.ndim != (3 if name == "gmm" else 2):
    raise ValueError(f"{name}: lhs {lhs.shape} / rhs {rhs.shape} have the wrong rank; see the "
                     "docstring for the expected shapes.")
  if lhs.shape[contract_lhs] != rhs.shape[contract_rhs]:
    raise ValueError(f"{name}: contracted dims differ: lhs {lhs.shape} dim {contract_lhs} vs rhs "
                     f"{rhs.shape} dim {contract_rhs}.")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be a 1-D integer array, got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}.")


def _gmm_forward(lhs, rhs, group_sizes, group_offset, opts: _Options) -> jax.Array:
  m, k = lhs.shape
  local_groups = rhs.shape[0]
  n = rhs.shape[1] if opts.transpose_rhs else rhs.shape[2]
  if m == 0 or n == 0:
    return jnp.zeros((m, n), opts.out_dtype)
  tiling = (opts.tiling or BlockSizes.default(opts.backend)).fit(opts.backend, m, k, n)
  meta = make_group_metadata(group_sizes, m, tiling.tm, group_offset, local_groups)
  rhs = rhs.astype(lhs.dtype)
  if opts.backend == "tpu":
    return tpu.gmm_tpu(lhs, rhs, meta, tiling=tiling, out_dtype=opts.out_dtype,
                       transpose_rhs=opts.transpose_rhs, interpret=opts.interpret)
  starts, ends = local_row_bounds(group_sizes, group_offset, local_groups, m)
  return gpu.gmm_gpu(lhs, rhs, meta, starts[0], ends[-1], tiling=tiling,
                     out_dtype=opts.out_dtype, transpose_rhs=opts.transpose_rhs,
                     interpret=opts.interpret)


def _tgmm_forward(lhs_rows, rhs, group_sizes, group_offset, local_groups: int,
                  opts: _Options) -> jax.Array:
  """lhs_rows [M,K] (rows contracted), rhs [M,N] -> [G_local,K,N]."""
  m, k = lhs_rows.shape
  n = rhs.shape[1]
  if m == 0 or k == 0 or n == 0:
    return jnp.zeros((local_groups, k, n), opts.out_dtype)
  tiling = (opts.tiling or BlockSizes.default(opts.backend)).fit(opts.backend, m, k, n)
  rhs = rhs.astype(lhs_rows.dtype)
  if opts.backend == "tpu":
    meta = make_group_metadata(group_sizes, m, tiling.tm, group_offset, local_groups)
    return tpu.tgmm_tpu(lhs_rows, rhs, meta, local_groups, tiling=tiling,
                        out_dtype=opts.out_dtype, interpret=opts.interpret)
  starts, ends = local_row_bounds(group_sizes, group_offset, local_groups, m)
  return gpu.tgmm_gpu(lhs_rows, rhs, starts, ends, tiling=tiling, out_dtype=opts.out_dtype,
                      interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, opts: _Options):
  return _gmm_forward(lhs, rhs, group_sizes, group_offset, opts)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, opts: _Options):
  out = _gmm_forward(lhs, rhs, group_sizes, group_offset, opts)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(opts: _Options, residuals, dout):
  lhs, rhs, group_sizes, group_offset = residuals
  dout = dout.astype(lhs.dtype)
  # d lhs = dout @ rhs_g^T: the same kernel with the other rhs orientation.
  dlhs_opts = dataclasses.replace(opts, transpose_rhs=not opts.transpose_rhs,
                                  out_dtype=lhs.dtype)
  dlhs = _gmm_forward(dout, rhs, group_sizes, group_offset, dlhs_opts)
  # d rhs_g = lhs_g^T @ dout_g (or its transpose): a tgmm over the same row groups.
  tgmm_opts = dataclasses.replace(opts, out_dtype=jnp.float32)
  if opts.transpose_rhs:
    drhs = _tgmm_forward(dout, lhs, group_sizes, group_offset, rhs.shape[0], tgmm_opts)
  else:
    drhs = _tgmm_forward(lhs, dout, group_sizes, group_offset, rhs.shape[0], tgmm_opts)
  return dlhs, drhs.astype(rhs.dtype), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None,
        *, transpose_rhs: bool = False, group_offset=0, tiling: BlockSizes | None = None,
        interpret: bool = False, backend: str | None = None) -> jax.Array:
  """Grouped matmul out[r] = lhs[r] @ rhs[group of r - group_offset], differentiable in lhs
  and rhs.

  lhs [M,K] with rows sorted by group; rhs [G_local,K,N] ([G_local,N,K] with transpose_rhs);
  group_sizes int[G] (G >= G_local; sum <= M); group_offset: first local group (an int or a
  traced scalar, e.g. from the expert-parallel shard index) -> [M,N] of
  `preferred_element_type` (default lhs.dtype), accumulated in float32.
  `tiling`: BlockSizes (default per backend); `interpret`: run the kernel in Pallas'
  interpreter (CPU tests); `backend`: 'tpu' | 'gpu' (default: this machine's).
  """
  _check_operands(lhs, rhs, group_sizes, 1, 2 if transpose_rhs else 1, "gmm")
  if rhs.shape[0] > group_sizes.shape[0]:
    raise ValueError(f"gmm: rhs has {rhs.shape[0]} groups but group_sizes only "
                     f"{group_sizes.shape[0]}.")
  opts = _Options(jnp.dtype(preferred_element_type or lhs.dtype), transpose_rhs, tiling,
                  interpret, resolve_backend(backend, interpret))
  return _gmm(lhs, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32), opts)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None,
         *, group_offset=0, num_local_groups: int | None = None,
         tiling: BlockSizes | None = None, interpret: bool = False,
         backend: str | None = None) -> jax.Array:
  """Transposed grouped matmul, the weight gradient of gmm: out[g] = lhs[:, rows of g] @
  rhs[rows of g].

  lhs [K,M], rhs [M,N], group_sizes int[G] -> [G_local,K,N] (G_local = num_local_groups,
  default G) of `preferred_element_type` (default lhs.dtype); an empty group gives zeros.
  """
  _check_operands(lhs, rhs, group_sizes, 1, 0, "tgmm")
  local_groups = group_sizes.shape[0] if num_local_groups is None else num_local_groups
  if not 0 < local_groups <= group_sizes.shape[0]:
    raise ValueError(f"tgmm: num_local_groups={num_local_groups}; use 1 .. "
                     f"{group_sizes.shape[0]} (the number of groups).")
  opts = _Options(jnp.dtype(preferred_element_type or lhs.dtype), False, tiling, interpret,
                  resolve_backend(backend, interpret))
  # The kernels read the contracted rows in [M,K] layout; under jit this transpose cancels
  # against a caller's own transpose (gmm's backward calls the kernel on [M,K] directly).
  return _tgmm_forward(lhs.T, rhs, group_sizes, jnp.asarray(group_offset, jnp.int32),
                       local_groups, opts)
