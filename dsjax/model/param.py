"""Parameter creation with logical axis names, and the variable types that are model state but
not parameters: the router bias and frozen tables."""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

AXES = "axes"  # metadata key holding a variable's logical axis names


class RouterBias(nnx.Variable):
  """Aux-loss-free load-balancing bias of a MoE router: used for expert selection only, updated
  outside the optimizer by the sign rule, never differentiated and never weight-decayed."""


class FrozenTable(nnx.Variable):
  """A fixed table of a layer, such as hash routing's token -> experts map: its values come
  from checkpoints and nothing in training changes them (no gradient, no optimizer state, no
  weight decay, no bias update)."""


# The model's variables outside nnx.Param: stored and restored with the parameters, kept out of
# gradients and the optimizer (dsjax.train.state.split_model).
NON_PARAMS = (RouterBias, FrozenTable)


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
