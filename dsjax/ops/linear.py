"""Projections as one 2-D matmul over all tokens.

`project(x, w, n)` contracts the last n axes of x with the first n axes of w. Leading (token)
axes are flattened to one row axis and w to a [K, F] matrix before the matmul, so that the
forward pass and both gradients are plain 2-D GEMMs. Written as an einsum over [B,T,...]
activations instead, XLA's CPU backend copies transposed activations before the
weight-gradient dots, which made the backward pass several times slower than the forward.

`OutMajor` is the same weight stored with its output axes first (PyTorch's nn.Linear order),
the decoding layout on CPU: there a product with few rows (the batch's new tokens) runs faster
as weight [F,K] . x [M,K] -> [F,M] than as x [M,K] . w [K,F] (1.4 to 2.5 times in
microbenchmarks; XLA's CPU dot streams the large operand best as the left one). `project`
takes either layout.
"""

import math

import jax
import jax.numpy as jnp


# Up to this many rows, an OutMajor projection computes the transposed product [F,M].
FEW_ROWS = 64
# dot_general dimension numbers: contract the last axis of two matrices, no batch axes.
_LAST_AXES = (((1,), (1,)), ((), ()))


@jax.tree_util.register_pytree_node_class
class OutMajor:
  """A weight w [*batch, K1..Kn, F1..Fm] (n input axes, `batch` leading axes such as MoE's
  experts) held as t [*batch, F1..Fm, K1..Kn]. Stands in for the array as a parameter's
  value: `param[...]` and `.astype` keep the layout; `in_major()` restores w."""

  def __init__(self, t: jax.Array, batch: int, contract: int):
    self.t, self.batch, self.contract = t, batch, contract

  @classmethod
  def from_in_major(cls, w: jax.Array | jax.ShapeDtypeStruct, batch: int, contract: int
                    ) -> "OutMajor":
    """w (or an abstract one: the OutMajor of its shape) in the output-major layout."""
    order = (*range(batch), *range(batch + contract, w.ndim), *range(batch, batch + contract))
    if isinstance(w, jax.ShapeDtypeStruct):
      return cls(jax.ShapeDtypeStruct(tuple(w.shape[i] for i in order), w.dtype), batch, contract)
    return cls(jnp.transpose(w, order), batch, contract)

  def in_major(self) -> jax.Array:
    b, n, ndim = self.batch, self.contract, self.t.ndim
    return jnp.transpose(self.t, (*range(b), *range(ndim - n, ndim), *range(b, ndim - n)))

  def __getitem__(self, key):
    if key is not Ellipsis:
      raise TypeError("An OutMajor weight supports only param[...]; use .in_major() to index.")
    return self

  def astype(self, dtype) -> "OutMajor":
    return OutMajor(self.t.astype(dtype), self.batch, self.contract)

  def tree_flatten(self):
    return (self.t,), (self.batch, self.contract)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


def project(x: jax.Array, w: jax.Array | OutMajor, contract: int = 1) -> jax.Array:
  """x [..., K1..Kn] . w [K1..Kn, F1..Fm] -> [..., F1..Fm] (n = `contract`); w may be an
  OutMajor [F1..Fm, K1..Kn]."""
  if isinstance(w, OutMajor):
    return _project_out_major(x, w, contract)
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  if w.shape[:contract] != inner:
    raise ValueError(f"project: x {x.shape} and w {w.shape} disagree on the {contract} "
                     "contracted axes.")
  out = w.shape[contract:]
  k = math.prod(inner)
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(*lead, *out)


def _project_out_major(x: jax.Array, w: OutMajor, contract: int) -> jax.Array:
  if w.batch or w.contract != contract:
    raise ValueError(f"project: an OutMajor weight with {w.batch} batch and {w.contract} input "
                     f"axes cannot contract {contract} axes of x {x.shape}.")
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  out = w.t.shape[:w.t.ndim - contract]
  if w.t.shape[w.t.ndim - contract:] != inner:
    raise ValueError(f"project: x {x.shape} and OutMajor w {w.t.shape} disagree on the "
                     f"{contract} contracted axes.")
  k = math.prod(inner)
  rows, t = x.reshape(-1, k), w.t.reshape(-1, k)
  if rows.shape[0] <= FEW_ROWS:
    y = out_major_product(t, rows).T
  else:
    y = jax.lax.dot_general(rows, t, _LAST_AXES)
  return y.reshape(*lead, *out)


def out_major_product(t: jax.Array, rows: jax.Array) -> jax.Array:
  """t [F,K] . rows [M,K] -> [F,M] (the transposed product), the weight as the left operand:
  the faster order for few rows on CPU. The barrier keeps XLA from folding a transpose of the
  result back into the dot ([M,K] . [K,F]), which would undo that order."""
  return jax.lax.optimization_barrier(jax.lax.dot_general(t, rows, _LAST_AXES))
