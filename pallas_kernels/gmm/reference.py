"""Pure-jnp grouped matmuls: the oracles the kernels are tested against.

Row r of lhs belongs to group g when start_g <= r < end_g (groups in order, sizes
`group_sizes`). Only the local groups group_offset .. group_offset + G_local - 1 are computed;
rows of other groups (and rows past sum(group_sizes)) give zeros.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def local_group_of_rows(group_sizes: jax.Array, m: int, group_offset, local_groups: int):
  """(local group index of each of the m rows, clipped into range; whether it is local)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  group = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
  local = group - jnp.asarray(group_offset, jnp.int32)
  is_local = (local >= 0) & (local < local_groups)
  return jnp.clip(local, 0, local_groups - 1), is_local


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  preferred_element_type=None, transpose_rhs: bool = False,
                  group_offset=0) -> jax.Array:
  """lhs [M,K], rhs [G_local,K,N] ([G_local,N,K] if transpose_rhs) -> [M,N]."""
  rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  local, is_local = local_group_of_rows(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])
  onehot = jax.nn.one_hot(local, rhs.shape[0], dtype=jnp.float32) * is_local[:, None]
  out = jnp.einsum("MK,MG,GKN->MN", lhs.astype(jnp.float32), onehot, rhs.astype(jnp.float32),
                   precision=_HIGHEST)
  return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   preferred_element_type=None, group_offset=0,
                   local_groups: int | None = None) -> jax.Array:
  """lhs [K,M], rhs [M,N] -> [G_local,K,N]: out[g] = lhs[:, rows of g] @ rhs[rows of g]."""
  local_groups = group_sizes.shape[0] if local_groups is None else local_groups
  local, is_local = local_group_of_rows(group_sizes, lhs.shape[1], group_offset, local_groups)
  onehot = jax.nn.one_hot(local, local_groups, dtype=jnp.float32) * is_local[:, None]
  out = jnp.einsum("KM,MG,MN->GKN", lhs.astype(jnp.float32), onehot, rhs.astype(jnp.float32),
                   precision=_HIGHEST)
  return out.astype(preferred_element_type or lhs.dtype)
