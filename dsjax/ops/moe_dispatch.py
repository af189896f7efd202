"""Routed-expert computation: three exact (dropless) dispatch implementations.

x [M,D] tokens, expert_ids int32[M,K], weights [M,K], w1/w3 [E,D,F] (gate/up), w2 [E,F,D].
Every dispatch takes `swiglu_limit` (0: none; DeepSeek-V4's clamp of the experts' gate and
up pre-activations, dsjax.ops.swiglu).
The dense and blocked dispatches also take the output-major layout (dsjax.ops.linear.OutMajor)
that decoding uses on CPU: w1/w3 [E,F,D] (experts kept in front), w2 [D,E,F] (w2 contracts
experts and hidden units together, so its output axis comes first).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from dsjax.ops.linear import out_major_product
from dsjax.ops.platform import target_platform
from dsjax.ops.swiglu import swiglu
from pallas_kernels.gmm import gmm


def _combine_matrix(expert_ids, weights, m: int, e: int) -> jax.Array:
  """[M,E] float32: each token's routing weight per expert, zero for unchosen experts."""
  return jnp.zeros((m, e), jnp.float32).at[jnp.arange(m)[:, None], expert_ids].add(
      weights.astype(jnp.float32))


def experts_dense(x, expert_ids, weights, w1, w3, w2, *, swiglu_limit: float = 0.0
                  ) -> jax.Array:
  """Every expert on every token, combined with a [M,E] weight matrix that is zero for
  unchosen experts. E/K times the needed FLOPs, but each expert's weights are read once, in
  place: the tokens are broadcast to [E,M,D] so that every einsum is batched over E with the
  weights in their stored layout (contracting x [M,D] with [E,D,F] directly makes XLA
  transpose all expert weights first). Fastest on CPU for few tokens (decoding)."""
  m, e = x.shape[0], w1.shape[0]
  combine = _combine_matrix(expert_ids, weights, m, e)
  xe = jnp.broadcast_to(x, (e,) + x.shape)
  h = swiglu(jnp.einsum("EMD,EDF->EMF", xe, w1), jnp.einsum("EMD,EDF->EMF", xe, w3),
             swiglu_limit)
  y = jnp.einsum("EMF,EFD->EMD", h, w2)
  return jnp.einsum("EMD,ME->MD", y, combine.astype(y.dtype))


def experts_dense_out_major(x, expert_ids, weights, w1t, w3t, w2t, *,
                            swiglu_limit: float = 0.0) -> jax.Array:
  """experts_dense with output-major weights w1t/w3t [E,F,D], w2t [D,E,F]: every product has
  the weights as its left operand and the few tokens as its right one, the operand order that
  XLA's CPU dot runs fastest for few rows. The routing weights scale the hidden units before
  the down-projection, so that it is one product summed over experts and hidden units together
  ([D,E*F] . [E*F,M]) instead of one per expert followed by a weighted sum. On the project's
  2-core CPU (D=512, E=16, F=256, M=8) an MoE layer of the decode step took 2.3 instead of
  2.7 ms."""
  m, (e, f, d) = x.shape[0], w1t.shape
  combine = _combine_matrix(expert_ids, weights, m, e)
  h = swiglu(jnp.einsum("EFD,MD->EFM", w1t, x), jnp.einsum("EFD,MD->EFM", w3t, x),
             swiglu_limit)
  h = h * combine.T[:, None, :].astype(h.dtype)
  return out_major_product(w2t.reshape(d, e * f), h.reshape(e * f, m).T).T


GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def unsort_and_combine(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """Rows y_sorted[M*K,D] in expert-sorted `order` -> sum over K of weights[M,K] * row, using a
  gather by the inverse permutation (no scatter-add)."""
  m, k = weights.shape
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m * k, dtype=order.dtype))
  y = y_sorted[inverse].reshape(m, k, -1)
  return jnp.einsum("MKD,MK->MD", y, weights.astype(y.dtype))


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def pallas_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """The Pallas grouped-matmul kernel (pallas_kernels.gmm) for this machine's backend; on CPU
  its interpreter (exact but slow: for tests)."""
  platform = target_platform()
  return gmm(lhs, rhs, group_sizes, interpret=platform == "cpu",
             backend=None if platform == "cpu" else platform)


def experts_sorted(x, expert_ids, weights, w1, w3, w2,
                   grouped_matmul: GroupedMatmul = ragged_dot, *,
                   swiglu_limit: float = 0.0) -> jax.Array:
  """Dropless sort-by-expert dispatch: the M*K (token, expert) rows are sorted by expert, each
  expert multiplies its contiguous rows (`grouped_matmul(lhs[R,D], rhs[E,D,F], sizes[E])`,
  lax.ragged_dot by default, the Pallas gmm kernel on TPU/GPU), and the rows are un-sorted by a
  gather before the weighted sum over K. Exact FLOPs; use on TPU/GPU (ragged_dot is emulated
  densely on CPU)."""
  k = expert_ids.shape[1]
  flat_ids = expert_ids.reshape(-1)
  order = jnp.argsort(flat_ids, stable=True)
  group_sizes = jnp.bincount(flat_ids, length=w1.shape[0]).astype(jnp.int32)
  y = grouped_ffn(x[order // k], group_sizes, w1, w3, w2, grouped_matmul,
                  swiglu_limit=swiglu_limit)
  return unsort_and_combine(y, order, weights)


def grouped_ffn(rows, group_sizes, w1, w3, w2, grouped_matmul: GroupedMatmul = ragged_dot, *,
                swiglu_limit: float = 0.0) -> jax.Array:
  """The experts' SwiGLU on rows [R,D] sorted by expert, group_sizes int32[E] (rows past
  their sum give zeros) -> [R,D]."""
  h = swiglu(grouped_matmul(rows, w1, group_sizes), grouped_matmul(rows, w3, group_sizes),
             swiglu_limit)
  return grouped_matmul(h, w2, group_sizes)


def _padded_layout(flat_ids: jax.Array, num_experts: int, block: int):
  """Where each expert-sorted row goes when every expert's rows are padded to a multiple of
  `block`: (sort order, destination row of each sorted row, expert of each block, capacity)."""
  rows = flat_ids.shape[0]
  order = jnp.argsort(flat_ids, stable=True)
  sizes = jnp.bincount(flat_ids, length=num_experts)
  padded = (sizes + block - 1) // block * block
  padded_ends = jnp.cumsum(padded)
  sorted_ids = flat_ids[order]
  rank = jnp.arange(rows) - (jnp.cumsum(sizes) - sizes)[sorted_ids]
  destination = (padded_ends - padded)[sorted_ids] + rank
  # Static bound on the padded rows: each expert wastes at most block - 1 rows.
  capacity = -(-(rows + num_experts * (block - 1)) // block) * block
  block_starts = jnp.arange(capacity // block) * block
  block_expert = jnp.minimum(jnp.searchsorted(padded_ends, block_starts, side="right"),
                             num_experts - 1)
  return order, destination, block_expert, capacity


def default_block(tokens: int, k: int, experts: int) -> int:
  """Rows per block of the blocked dispatch: about one block per expert on average, a power
  of two between 8 and 128."""
  return int(min(128, max(8, 2 ** round(math.log2(max(tokens * k // experts, 1))))))


def experts_blocked(x, expert_ids, weights, w1, w3, w2, block: int | None = None,
                    out_major: bool = False, *, swiglu_limit: float = 0.0) -> jax.Array:
  """Dropless block-padded dispatch for CPU: rows sorted by expert, each expert's rows padded to
  whole blocks, every block multiplied by its expert's weights in one batched einsum. FLOPs are
  (M*K + E*block) rows' worth instead of the dense path's M*E, with static shapes.
  `out_major`: w1/w3 are [E,F,D] and w2 [D,E,F]."""
  m, k = expert_ids.shape
  e, d = w1.shape[0], x.shape[1]
  block = block or default_block(m, k, e)
  order, destination, block_expert, capacity = _padded_layout(expert_ids.reshape(-1), e, block)
  rows = jnp.zeros((capacity, d), x.dtype).at[destination].set(x[order // k])
  rows = rows.reshape(capacity // block, block, d)
  if out_major:
    up, down, w2_blocks = "GBD,GFD->GBF", "GBF,DGF->GBD", w2[:, block_expert]
  else:
    up, down, w2_blocks = "GBD,GDF->GBF", "GBF,GFD->GBD", w2[block_expert]
  h = swiglu(jnp.einsum(up, rows, w1[block_expert]), jnp.einsum(up, rows, w3[block_expert]),
             swiglu_limit)
  y = jnp.einsum(down, h, w2_blocks).reshape(capacity, d)
  return unsort_and_combine(y[destination], order, weights)
