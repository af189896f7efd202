"""Parameter creation with logical axis names, and the router-bias variable type."""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

AXES = "axes"  # metadata key holding a variable's logical axis names


class RouterBias(nnx.Variable):
  """Aux-loss-free load-balancing bias of a MoE router: used for expert selection only, updated
  outside the optimizer by the sign rule, never differentiated and never weight-decayed."""


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
                 std: float, dtype) -> nnx.Param:
  """A normal(0, std) initialised parameter annotated with logical `axes`."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank.")
  value = (jax.random.normal(rngs.params(), tuple(shape), jnp.float32) * std).astype(dtype)
  return nnx.Param(value, **{AXES: tuple(axes)})


def ones_param(shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(tuple(shape), dtype), **{AXES: tuple(axes)})


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names of a variable (replicated dims are None)."""
  return tuple(variable.get_metadata().get(AXES, (None,) * variable.get_value().ndim))
