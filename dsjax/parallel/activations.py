"""Activation sharding: logical axes of activations -> mesh axes, applied as sharding
constraints where the model names them (layer boundaries, logits).

Model code says what an activation's dims are (`constrain(x, TOKENS)`); which mesh axes that
means lives here. Without a context mesh (eager CPU runs, one device) `constrain` is the
identity; compiled steps run under their mesh (`under_mesh`), so XLA keeps the batch split over
the batch axes instead of gathering activations where a parameter's sharding pulls them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

# The batch dimension is split over every axis that does not split the model's features: the
# expert axis holds different tokens for the non-expert layers, as in FSDP+EP setups.
BATCH_AXES = ("data", "fsdp", "expert")
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES), ("length", None), ("embed", None), ("vocab", "tensor"),
    ("heads", "tensor"), ("mlp", "tensor"),
)
TOKENS = ("batch", "length", "embed")    # the residual stream [B,T,D]
STREAMS = ("batch", "length", None, "embed")  # mHC's n residual streams [B,T,n,D]
LOGITS = ("batch", "length", "vocab")    # [B,T,V]


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def activation_spec(axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=ACTIVATION_RULES) -> PartitionSpec:
  """The PartitionSpec of an activation with logical `axes` and `shape` on `mesh`: each
  logical axis's mesh axes, keeping only those the mesh has (size > 1) and whose product
  divides the dim, each mesh axis used once."""
  table, used, spec = dict(rules), set(), []
  for axis, size in zip(axes, shape):
    target = table.get(axis) if axis is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
    product = 1
    for n in names:
      product *= mesh.shape[n]
    if not names or size % product:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding of its logical `axes` under the context mesh (the
  identity without one)."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: logical axes {tuple(axes)} do not match shape {x.shape}.")
  return jax.lax.with_sharding_constraint(x, activation_spec(axes, x.shape, mesh))


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the context mesh (abstractly: nothing is placed), so that the
  activation constraints and the kernels' shard_maps inside it see the mesh."""
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  # jit names the program after the function (op names, dumps): keep the step's name.
  traced.__name__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__",
                                                    "step"))
  return traced

