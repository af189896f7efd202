"""Logical axis names -> mesh axes. The mapping lives here and in experiment configs, never in
model code. Mesh axes: data, fsdp, expert, tensor."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from dsjax.model.param import logical_axes

LOGICAL_AXES = ("vocab", "embed", "q_lora", "kv_lora", "heads", "head_dim", "mlp", "experts",
                "expert_mlp", "layers")
MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Experts on `expert`, heads and MLP hidden dims on `tensor`, the model dim FSDP-sharded. The
# low-rank dims are FSDP-sharded too: wq_b [q_lora, heads, head_dim] and wkv_b [kv_lora, ...]
# have no model dim, and replicated they would be DeepSeek-V3's largest replicated weights
# (wq_b alone: 8.2 GiB of fp32 master weights per chip, and twice that of AdamW moments). A
# weight that has both (wq_a, wkv_a) keeps fsdp on its model dim: an axis shards one dim.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("q_lora", "fsdp"), ("kv_lora", "fsdp"),
    ("heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("experts", "expert"),
    ("expert_mlp", "tensor"), ("layers", None),
)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for logical `axes`; a mesh axis already used by an earlier dim is skipped
  (a mesh axis can shard only one dim of an array)."""
  table = dict(rules)
  unknown = [a for a in axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"Logical axes {unknown} have no sharding rule; add them to the rules "
                     f"(known: {sorted(table)}).")
  used, spec = set(), []
  for axis in axes:
    mesh_axis = table.get(axis) if axis is not None else None
    spec.append(None if mesh_axis in used else mesh_axis)
    used.add(mesh_axis)
  return PartitionSpec(*spec)


def state_partition_specs(state: nnx.State, rules=DEFAULT_RULES):
  """A pytree of PartitionSpecs matching `state` (an nnx.State of annotated variables)."""
  return jax.tree.map(lambda v: logical_to_spec(logical_axes(v), rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
