"""The device mesh (axes data, fsdp, expert, tensor) from an experiment's `mesh` section, and
the shardings of batches and of train state on it."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.model.param import logical_axes
from dsjax.parallel.activations import BATCH_AXES
from dsjax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec

__all__ = ["BATCH_AXES", "batch_parallelism", "batch_sharding", "make_mesh", "mesh_shape",
           "tree_shardings"]


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """{axis: size} for `mesh_cfg` (attributes data, fsdp, expert, tensor; one may be -1 = the
  devices left over) on `num_devices` devices."""
  sizes = {axis: int(getattr(mesh_cfg, axis)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  bad = [f"{axis}={size}" for axis, size in sizes.items() if size == 0 or size < -1]
  if bad or len(free) > 1:
    raise ValueError(f"Mesh sizes must be >= 1 with at most one -1; got {sizes}. Set "
                     "--config.mesh.data/fsdp/expert/tensor accordingly.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"Mesh {sizes}: {num_devices} devices are not divisible by the fixed "
                       f"axes' product {fixed}; change --config.mesh.*.")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"Mesh {sizes} has {math.prod(sizes.values())} devices but "
                     f"{num_devices} are available; make the product of --config.mesh.* "
                     f"equal {num_devices} (or set one axis to -1).")
  return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes MESH_AXES over `devices` (default: all), laid out for the topology.
  Devices of several TPU slices (multi-slice): `data` spans the slices (their data-center
  network), every other axis stays inside a slice (its ICI)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dims = [shape[axis] for axis in MESH_AXES]
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    return Mesh(_multi_slice_grid(dims, devices, slices), MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(dims)  # no topology info: plain order
  return Mesh(grid, MESH_AXES)


def _multi_slice_grid(dims: list[int], devices, slices: int) -> np.ndarray:
  data = MESH_AXES.index("data")
  if dims[data] % slices:
    raise ValueError(f"The devices span {slices} slices, which split the mesh's data axis; "
                     f"mesh.data={dims[data]} is not a multiple of {slices}: set "
                     f"--config.mesh.data to a multiple of {slices}.")
  ici = [size // slices if i == data else size for i, size in enumerate(dims)]
  dcn = [slices if i == data else 1 for i in range(len(dims))]
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)


def batch_parallelism(mesh: Mesh) -> int:
  """How many ways the global batch is split."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] batch array: B over BATCH_AXES, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _fitting_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """`spec` without the mesh axes that do not divide their dimension (that dim replicates)."""
  return PartitionSpec(*(axis if axis is None or shape[i] % mesh.shape[axis] == 0 else None
                         for i, axis in enumerate(spec)))


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree mixing nnx Variables (sharded by their logical `axes`) and
  plain arrays (replicated). Works on abstract (ShapeDtypeStruct) and concrete trees; the
  result has the structure of `tree` with each array leaf replaced by its sharding."""
  def leaf_sharding(node):
    if isinstance(node, nnx.Variable):
      value = node.get_value()
      spec = _fitting_spec(logical_to_spec(logical_axes(node), rules), value.shape, mesh)
      return node.replace(value=NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
